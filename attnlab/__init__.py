"""attnlab: attention mechanisms for convolutional networks — FMMNet, AW-convolution, CRAM and the classic baselines —
with a training engine, honest comparisons and the analyses that test what the papers claim."""

from .errors import AttnlabError
from .layers import create_attn, get_attn, list_attn, register_attn
from .models import capture_attention, convert, create_model, list_models, register_attention

__version__ = "0.1.0"
__all__ = [
    "AttnlabError",
    "capture_attention",
    "convert",
    "create_attn",
    "create_model",
    "get_attn",
    "list_attn",
    "list_models",
    "register_attn",
    "register_attention",
]
