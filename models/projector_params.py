"""GLaMM checkpoint names -> projector parameter paths (tables; see models/param_tables)."""

from __future__ import annotations

from models.param_tables import Table, identity, linear_weight

# `model.mm_projector` is nn.Sequential(Linear, GELU, Linear): weights at indices 0 and 2.
MM_PROJECTOR_TABLE: Table = (
    (r"model\.mm_projector\.0\.weight", "linear_1.kernel", linear_weight),
    (r"model\.mm_projector\.0\.bias", "linear_1.bias", identity),
    (r"model\.mm_projector\.2\.weight", "linear_2.kernel", linear_weight),
    (r"model\.mm_projector\.2\.bias", "linear_2.bias", identity),
)

# `model.text_hidden_fcs` is ModuleList([Sequential(Linear, ReLU, Linear, Dropout(0.0))]).
TEXT_HIDDEN_FCS_TABLE: Table = (
    (r"model\.text_hidden_fcs\.0\.0\.weight", "fc1.kernel", linear_weight),
    (r"model\.text_hidden_fcs\.0\.0\.bias", "fc1.bias", identity),
    (r"model\.text_hidden_fcs\.0\.2\.weight", "fc2.kernel", linear_weight),
    (r"model\.text_hidden_fcs\.0\.2\.bias", "fc2.bias", identity),
)
