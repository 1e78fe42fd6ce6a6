"""Weights from a formula for a tiny DINOv2 ViT (no download, no random generator whose stream could
change): the fixture `dinov2_tiny_io.safetensors` was made by loading these same weights into the
official model (tests/fixtures/README.md)."""
import math

import torch

# The tiny network of the parity fixture: DINOv2's layout (patch 14, 518 px grid, layer scale, MLP
# ratio 4, heads 64 wide) at width 128 and depth 2.
TINY = dict(img_size=518, patch_size=14, width=128, depth=2, num_heads=2, mlp_ratio=4.0, layer_scale=True)


def unit_hash(shape, i):
    """Unit-variance pseudo-random numbers of `shape`: `(frac(sin(12.9898 n + 78.233 i) * 43758.5453) - 0.5)
    * sqrt(12)` for n = 0, 1, ... in float64, then float32."""
    n = torch.arange(math.prod(shape), dtype=torch.float64)
    value = torch.sin(12.9898 * n + 78.233 * i) * 43758.5453
    return ((value - value.floor() - 0.5) * math.sqrt(12)).float().reshape(shape)


def formula_weights(shapes):
    """A DINOv2 state dict for `{name: shape}`; key i of the sorted names gets `unit_hash(shape, i)`
    scaled by its kind: norms and layer scales 1 + 0.1 u, biases 0.1 u, matrices u / sqrt(fan in),
    the patch projection u / sqrt(3 * 14 * 14), tokens and position embeddings u."""
    state = {}
    for i, name in enumerate(sorted(shapes)):
        shape = tuple(shapes[name])
        u = unit_hash(shape, i)
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", ".gamma")):
            state[name] = 1 + 0.1 * u
        elif name.endswith(".bias"):
            state[name] = 0.1 * u
        elif name.endswith(".weight"):
            state[name] = u / math.sqrt(math.prod(shape[1:]))
        else:   # cls_token, pos_embed, mask_token
            state[name] = u
    return state
