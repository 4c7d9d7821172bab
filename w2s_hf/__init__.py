"""w2s-hf: Where-to-Steer activation steering for Hugging Face causal LMs.

Example:

```python
>>> from w2s_hf import W2SSteeringModel
>>> model = W2SSteeringModel.from_pretrained("path/or/hub-id")
>>> out = model.generate(**model.tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=20)
```
"""

from .bundle import BundleConfig, BundleError, SteeringBundle
from .encoders import HFEncoder, InternalEncoder, PromptEncoder, encoder_from_spec, sentence_transformers_encoder
from .layers import find_decoder_layers
from .modeling import W2SSteeringModel, register_with_transformers
from .steering import AdditiveIntervention, SteeringEngine, SteeringRoute

__version__ = "0.1.0"

register_with_transformers()

__all__ = [
    "AdditiveIntervention",
    "BundleConfig",
    "BundleError",
    "HFEncoder",
    "InternalEncoder",
    "PromptEncoder",
    "SteeringBundle",
    "SteeringEngine",
    "SteeringRoute",
    "W2SSteeringModel",
    "encoder_from_spec",
    "find_decoder_layers",
    "sentence_transformers_encoder",
]
