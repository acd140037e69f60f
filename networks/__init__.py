"""Models: an encoder registry (timm names pass through), the projection head and the dual encoder."""
from . import convnet as _convnet  # noqa: F401  (registers the built-in image encoders)
from . import efficientnet_lite as _efficientnet_lite  # noqa: F401
from .dual_encoder import SIDES, Blend, DualEncoder, DualEncoderConfig
from .heads import ProjectionHead
from .image_encoders import create_image_encoder, is_convolutional, is_known_image_encoder, timm_name, unknown_image_encoder_message
from .registry import IMAGE_ENCODERS, TEXT_ENCODERS, EncoderError, PretrainedWeightsUnavailable, UnknownEncoder
from .text_encoders import TextEncoder, create_text_encoder

__all__ = ["SIDES", "Blend", "DualEncoder", "DualEncoderConfig", "ProjectionHead", "create_image_encoder",
           "is_convolutional", "is_known_image_encoder", "timm_name", "unknown_image_encoder_message", "IMAGE_ENCODERS", "TEXT_ENCODERS",
           "EncoderError", "PretrainedWeightsUnavailable", "UnknownEncoder", "TextEncoder", "create_text_encoder"]
