"""Model helpers: reference architectures shared by tests, benchmarks and ``hessop bench``."""

from hessop.models import reference
from hessop.models.reference import REFERENCE_MODELS, ReferenceSpec, get_reference

__all__ = ["REFERENCE_MODELS", "ReferenceSpec", "get_reference", "reference"]
