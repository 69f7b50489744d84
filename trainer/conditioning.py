"""What a UNet is conditioned on for a batch of prompts, for every family the trainer trains.

SD 1.x/2.x: one text encoder's hidden states. The SDXL family adds a second, larger text
encoder (the two hidden states side by side), the second encoder's pooled embedding, and the
"micro-conditioning" time ids: the original size, the crop's top-left corner and the target
size, (H, W, 0, 0, H, W) for an uncropped picture at the native resolution. `Conditioning`
holds them as rows that index, concatenate and repeat together, and `embed` makes them the
way the family's own pipeline would.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class Conditioning:
    """One row per prompt: hidden states [B, tokens, width], and for the SDXL family the pooled
    text embeddings [B, width₂] and the micro-conditioning time ids [B, 6]."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _parts(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def _map(self, fn) -> Conditioning:
        return replace(self, **{name: fn(part) for name, part in self._parts().items()})

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, rows) -> Conditioning:
        return self._map(lambda part: part[rows])

    def repeat_interleave(self, times: int) -> Conditioning:
        return self._map(lambda part: part.repeat_interleave(times, dim=0))

    def expand(self, rows: int) -> Conditioning:
        """A single row repeated `rows` times (as a view)."""
        return self._map(lambda part: part.expand(rows, *part.shape[1:]))

    def cat(self, other: Conditioning) -> Conditioning:
        """These rows, then `other`'s."""
        return replace(
            self,
            **{
                name: torch.cat([part, getattr(other, name)])
                for name, part in self._parts().items()
            },
        )

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts().values())

    def unet_kwargs(self) -> dict:
        """The UNet's keyword arguments for these rows."""
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def is_xl(pipe) -> bool:
    """Whether a pipeline is of the SDXL family's structure (two text encoders, added
    conditioning): diffusers' StableDiffusionXLPipeline and its kin."""
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def embed(pipe, prompts: list[str], resolution: int) -> Conditioning:
    """The conditioning for prompts, made as the family's own pipeline makes it, on the
    UNet's device and in its dtype. `resolution` is the picture's side (SDXL's time ids)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    if not is_xl(pipe):
        return Conditioning(clip_hidden(pipe, prompts).to(device, dtype))
    hidden, pooled = [], []
    for start in range(0, len(prompts), 32):
        part = prompts[start : start + 32]
        found = pipe.encode_prompt(
            prompt=part,
            device=pipe.text_encoder_2.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        hidden.append(found[0])
        pooled.append(found[2])
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=dtype)
    return Conditioning(
        torch.cat(hidden).to(device, dtype),
        torch.cat(pooled).to(device, dtype),
        time_ids.expand(len(prompts), 6).to(device),
    )


def clip_hidden(pipe, prompts: list[str]) -> torch.Tensor:
    """One CLIP text encoder's last hidden states, cut to the tokenizer's window (with
    gradients when the caller trains the encoder: the demo world's training does)."""
    tokenizer, device = pipe.tokenizer, pipe.text_encoder.device
    parts = []
    for start in range(0, len(prompts), 32):
        ids = tokenizer(
            prompts[start : start + 32],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        parts.append(pipe.text_encoder(ids.to(device))[0])
    return torch.cat(parts)


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders (one, or two for the SDXL family)."""
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if is_xl(pipe) else [])
