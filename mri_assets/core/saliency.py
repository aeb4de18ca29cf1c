"""Grad-CAM saliency maps and their overlays on the scan.

Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) weights the activation maps
of the last convolutional stage by the mean gradient of the predicted class's logit, keeps the
positive part and scales it to the image: where the evidence for that class was. Works for any
HF vision model whose backbone has ``encoder.stages`` (ResNet, ConvNeXt, ...), else on the
module holding the model's last ``Conv2d``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mri_assets.core.devices import model_on, placement
from mri_assets.core.model import preprocess_pixels
from mri_assets.core.preprocessing import Preprocessing

if TYPE_CHECKING:
    from transformers import PreTrainedModel

OVERLAY_ALPHA = 0.45  # share of the heat map in the overlay
BATCH_SIZE = 16  # gradients keep every activation: smaller batches than inference


def last_convolutional_stage(model: PreTrainedModel) -> torch.nn.Module:
    """The backbone's last stage (``encoder.stages[-1]``), else the parent of the last Conv2d."""
    stages = getattr(getattr(model.base_model, "encoder", None), "stages", None)
    if isinstance(stages, torch.nn.ModuleList) and len(stages):
        return stages[-1]
    parent = None
    for module in model.modules():
        if any(isinstance(child, torch.nn.Conv2d) for child in module.children()):
            parent = module
    if parent is None:
        raise ValueError(f"{type(model).__name__} has no convolution: Grad-CAM needs one")
    return parent


def grad_cam(
    model: PreTrainedModel,
    preprocessing: Preprocessing,
    pixels: Sequence[np.ndarray],
    target_classes: Sequence[int] | None = None,
    *,
    device: str | torch.device | None = None,
) -> list[np.ndarray]:
    """One map per image, (H, W) float32 in [0, 1] at the image's own size, for the class in
    ``target_classes`` (default: the predicted one). Runs on ``device`` (see core/devices.py;
    None: the CPU) in float32: gradients in mixed precision would need loss scaling for a map
    that costs one backward pass. The model is handed back on the device it came on."""
    where = placement(device, mixed_precision=False)
    stage = last_convolutional_stage(model)
    captured: list[torch.Tensor] = []
    handle = stage.register_forward_hook(lambda _m, _i, output: captured.append(output))
    model.eval()
    maps: list[np.ndarray] = []
    try:
        with model_on(model, where):
            for start in range(0, len(pixels), BATCH_SIZE):
                part = list(pixels[start : start + BATCH_SIZE])
                wanted = (
                    None if target_classes is None else target_classes[start : start + len(part)]
                )
                captured.clear()
                batch = where.to_device(preprocess_pixels(part, preprocessing))
                cams = _batch_cams(model, batch, captured, wanted).cpu()
                maps.extend(
                    _resized(cam, image.shape[:2]) for cam, image in zip(cams, part, strict=True)
                )
    finally:
        handle.remove()
    return maps


def _batch_cams(
    model: PreTrainedModel,
    batch: torch.Tensor,
    captured: list[torch.Tensor],
    wanted: Sequence[int] | None,
) -> torch.Tensor:
    # The input requires grad so the graph exists even when the weights are frozen.
    batch = batch.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(pixel_values=batch).logits
        activations = captured[-1]
        targets = (
            logits.argmax(dim=1)
            if wanted is None
            else torch.as_tensor(list(wanted), dtype=torch.long, device=logits.device)
        )
        chosen = logits.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(chosen, activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(dim=1)).detach()
    peak = cams.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return cams / peak[:, None, None]


def _resized(cam: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    resized = F.interpolate(cam[None, None], size=shape, mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0, 1).numpy().astype(np.float32)


def overlay_png(pixels: np.ndarray, saliency: np.ndarray, max_side: int | None = None) -> bytes:
    """The scan in grey with the map as a heat colour on top, PNG bytes (``max_side`` shrinks
    it, for metadata)."""
    from matplotlib import colormaps

    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels.astype(np.float32)
    scan = np.repeat(grey[..., None], 3, axis=2) / 255.0
    heat = colormaps["jet"](saliency)[..., :3]
    mixed = (1 - OVERLAY_ALPHA * saliency[..., None]) * scan + OVERLAY_ALPHA * saliency[
        ..., None
    ] * heat
    image = Image.fromarray(np.clip(mixed * 255, 0, 255).astype(np.uint8), "RGB")
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
