"""altp_jax."""
