"""Models that `mmtune eval` and `mmtune analyze` can score: a registry of backends (id -> class).

Contract. `open_model(path, backend=None, template=None, device=..., dtype=...)`
returns an `EvalModel` for one of:

* `mmtune`     -- an mmtune saved model, checkpoint or run folder (its latest
  checkpoint); prompts use the template it trained with (or `template`);
* `llava-hf`   -- a `LlavaForConditionalGeneration` folder (llava-hf releases,
  `mmtune export --format hf-llava`); prompts come from its processor's chat
  template, images from its image processor;
* `causal-lm`  -- any other transformers causal-LM folder (`AutoModelForCausalLM`);
  prompts come from its tokenizer's chat template (or an mmtune `template`).

The backend is detected from the folder (first class in `BACKENDS` whose
`matches` accepts it) unless named. Every backend gives the same four things:
`render(messages)` (the exact prompt text, which keys the prediction cache),
`prompt_inputs(messages, images)` (token ids and extra forward inputs, for the
analyses), `generate(prompt_records, settings)` (batched greedy/sampled answers
under one `mmtune.eval.generate.DecodeSettings`, one per prompt, or a
`PromptSkip`) and `model` (a causal LM called as
``model(input_ids, attention_mask, **extra).logits``). The tokenizer loads at
once; the weights on first use, so a fully cached eval never loads them.

Prompts are records whose messages end on a user turn and whose user turns
hold one `<image>` placeholder per image, in reading order (mmtune's unified
format); HF backends turn them into the list-of-parts messages processors
take.
"""

from __future__ import annotations

import gc
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmtune import runs
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.data.tokenizer import load_tokenizer
from mmtune.errors import MMTuneError
from mmtune.eval.generate import (
    DecodeSettings,
    PromptSkip,
    check_prompt_record,
    generate_prompts,
    max_positions,
    tokenize_for_generation,
)

# --------------------------------------------------------------------------- #
# Fingerprints (the prediction cache's model key)
# --------------------------------------------------------------------------- #

_FULL_HASH_BYTES = 64 << 20
_SAMPLE_BYTES = 4 << 20


def fingerprint_model(folder: str | Path) -> str:
    """A short hash of a saved model folder's files (training-state files excluded).

    Files up to 64 MiB are hashed whole; larger weight files by their size and
    three 4 MiB samples (start, middle, end), so fingerprinting a 7B checkpoint
    stays fast. Frozen pretrained parts that the folder only names (hub ids,
    folders in `model_config.yaml`) enter through that file's text.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        # Training state (optimizer, RNG of every rank, ...) does not change what the model generates.
        if not p.is_file() or runs.is_training_state_file(p.name) or p.name.startswith("."):
            continue
        size = p.stat().st_size
        h.update(f"{p.relative_to(folder).as_posix()}\0{size}\0".encode())
        with p.open("rb") as fh:
            if size <= _FULL_HASH_BYTES:
                for chunk in iter(partial(fh.read, 1 << 20), b""):
                    h.update(chunk)
            else:
                for start in (0, size // 2, size - _SAMPLE_BYTES):
                    fh.seek(start)
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- #
# The backend interface
# --------------------------------------------------------------------------- #


class EvalModel(ABC):
    """One model to score. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str]

    def __init__(self, folder: Path, *, template: str | None, device: str, dtype: str | None,
                 trust_remote_code: bool = False) -> None:
        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.template_name = template
        self.trust_remote_code = trust_remote_code  # the user's word, never the checkpoint's

    @classmethod
    @abstractmethod
    def matches(cls, path: Path) -> bool:
        """Whether `path` is a folder this backend reads."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any: ...

    @property
    @abstractmethod
    def takes_images(self) -> bool: ...

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The causal LM, loaded on first use, in eval mode on `device`."""

    @abstractmethod
    def render(self, messages: Sequence[dict[str, str]], meta: dict[str, Any] | None = None) -> str:
        """The prompt text (ending where the assistant answers) exactly as the model reads it."""

    @abstractmethod
    def prompt_inputs(self, messages: Sequence[dict[str, str]], images: Sequence[str],
                      meta: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any] | None]:
        """Token ids of the rendered prompt (image tokens expanded) and extra forward inputs (pixel_values)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Record], settings: DecodeSettings, *, progress: bool = False,
                 desc: str = "generate") -> list[str | PromptSkip]:
        """One answer per prompt record, in order; prompts that cannot run become `PromptSkip`s."""

    @abstractmethod
    def _new_tokens(self, ids: torch.Tensor, extra: dict[str, Any] | None, max_new_tokens: int,
                    stops: list[int]) -> list[int]:
        """Greedy new token ids after one prompt (the model's own `generate`)."""

    @abstractmethod
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer."""

    @torch.no_grad()
    def greedy_ids(self, ids: Sequence[int], extra: dict[str, Any] | None, max_new_tokens: int) -> list[int]:
        """The greedy answer to one tokenized prompt as token ids, cut before the first stop token.

        The token analyses rank these ids directly: re-tokenizing decoded text
        does not give back the generated ids (byte-level pieces, merges).
        """
        stops = self.stop_ids()
        model = self.model
        device = next(model.parameters()).device
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        ex = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in (extra or {}).items()}
        new = self._new_tokens(x, ex or None, max_new_tokens, stops)
        ends = [new.index(t) for t in stops if t in new]
        return new[: min(ends)] if ends else new

    @property
    def default_dtype(self) -> str:
        return self.dtype or "float32"

    def fingerprint(self) -> str:
        return fingerprint_model(self.folder)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.folder), "backend": self.kind, "template": self.template_name,
                "takes_images": self.takes_images}

    def release(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- #
# mmtune checkpoints
# --------------------------------------------------------------------------- #


class MMTuneBackend(EvalModel):
    """An mmtune saved model / checkpoint / run folder, prompted with its training template."""

    kind = "mmtune"

    def __init__(self, folder: Path, *, template: str | None, device: str, dtype: str | None,
                 trust_remote_code: bool = False) -> None:
        from mmtune.data.templates import get_template
        from mmtune.eval.generate import DEFAULT_TEMPLATE
        from mmtune.model.io import load_model_config

        folder = runs.resolve_model_folder(folder)
        super().__init__(folder, template=template or runs.trained_template(folder) or DEFAULT_TEMPLATE,
                         device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        # Refuses a checkpoint that would run its own code unless the user passed --trust-remote-code.
        self.config = load_model_config(folder, trust_remote_code=trust_remote_code)
        self._bundle: Any = None
        self._tokenizer = load_tokenizer(folder / runs.TOKENIZER_DIR, trust_remote_code=trust_remote_code)  # the user's word
        self.template = get_template(self.template_name, self._tokenizer)

    @classmethod
    def matches(cls, path: Path) -> bool:
        try:
            runs.resolve_model_folder(path)
        except MMTuneError:
            return False
        return True

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def takes_images(self) -> bool:
        return self.config.mode == "mllm"

    @property
    def default_dtype(self) -> str:
        return self.dtype or self.config.lm.dtype

    @property
    def bundle(self) -> Any:
        if self._bundle is None:
            from mmtune.model.io import load_model

            self._bundle = load_model(self.folder, device=self.device, dtype=self.dtype,
                                      trust_remote_code=self.trust_remote_code)
        return self._bundle

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    def render(self, messages: Sequence[dict[str, str]], meta: dict[str, Any] | None = None) -> str:
        from mmtune.data.encode import prompt_text

        return prompt_text(messages, self._tokenizer, self.template, meta=meta)

    def prompt_inputs(self, messages: Sequence[dict[str, str]], images: Sequence[str],
                      meta: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any] | None]:
        from mmtune.data.images import load_image

        b = self.bundle
        prompt = tokenize_for_generation(b, "<prompt>", messages, self.template, images, meta)
        if not images:
            return prompt.ids, None
        if b.image_transform is None:
            raise MMTuneError(f"{self.folder}: the model is text-only but the prompt has images")
        return prompt.ids, {"pixel_values": torch.stack([b.image_transform(load_image(p)) for p in images])}

    def generate(self, prompts: Sequence[Record], settings: DecodeSettings, *, progress: bool = False,
                 desc: str = "generate") -> list[str | PromptSkip]:
        # Looked up in this module at call time, so tests can replace it to fake or forbid generation.
        return generate_prompts(self.bundle, prompts, self.template, settings=settings, progress=progress,
                                desc=desc)

    def stop_ids(self) -> list[int]:
        from mmtune.data.encode import stop_token_ids

        return stop_token_ids(self._tokenizer, self.template)

    def _new_tokens(self, ids: torch.Tensor, extra: dict[str, Any] | None, max_new_tokens: int,
                    stops: list[int]) -> list[int]:
        tok = self._tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self.model.generate(ids, torch.ones_like(ids), pixel_values=(extra or {}).get("pixel_values"),
                                  max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad)
        return out[0].tolist()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "mode": self.config.mode}

    def release(self) -> None:
        self._bundle = None
        super().release()


# --------------------------------------------------------------------------- #
# Hugging Face folders
# --------------------------------------------------------------------------- #


def _hf_config(path: Path) -> dict[str, Any] | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _as_parts(content: str) -> list[dict[str, str]]:
    """mmtune's string content with `<image>` placeholders -> the list of typed parts processors take.

    LLaVA's processor templates (llava-hf's and `mmtune export`'s) render an image part as "<image>\n",
    so a placeholder takes the newline that follows it along.
    """
    import re

    parts: list[dict[str, str]] = []
    for i, piece in enumerate(re.split(re.escape(IMAGE_PLACEHOLDER) + "\n?", content)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _needs_special_tokens(text: str, tokenizer: Any) -> bool:
    """Add the tokenizer's special tokens unless the chat template already wrote the BOS token.

    Chat templates such as Llama-3's start with `<|begin_of_text|>`; tokenizing
    that text with `add_special_tokens=True` would give two BOS tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


class _HFBackend(EvalModel):
    """Shared by the transformers backends: dtype, device, batched `generate`, stop handling."""

    _model: Any = None
    hf_class: str  # the transformers class that loads the folder, named by each backend
    _template: Any = None  # the mmtune template named by `template`; None: the folder's own chat template

    def _choose_template(self, template: str | None, owner: Any, what: str, hint: str = "") -> None:
        """Prompt with the mmtune template `template`, or else with the chat template of `owner`
        (the folder's `what`: processor or tokenizer), which must then have one."""
        if template:
            from mmtune.data.templates import get_template

            self._template = get_template(template, self.tokenizer)
        elif not getattr(owner, "chat_template", None):
            raise MMTuneError(f"{self.folder}: the {what} has no chat template; name one with `template`{hint}")
        self.template_name = template or f"{what} chat template"

    def render(self, messages: Sequence[dict[str, str]], meta: dict[str, Any] | None = None) -> str:
        if self._template is not None:
            from mmtune.data.encode import prompt_text

            return prompt_text(messages, self.tokenizer, self._template, meta=meta)
        return self._own_chat_template(messages)

    @abstractmethod
    def _own_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt rendered by the folder's own chat template."""

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            import transformers

            self._model = getattr(transformers, self.hf_class).from_pretrained(
                str(self.folder), dtype=self._torch_dtype() or "auto",
                trust_remote_code=self.trust_remote_code).to(self.device).eval()
        return self._model

    def _torch_dtype(self) -> torch.dtype | None:
        from mmtune.model.build import resolve_dtype

        dt = resolve_dtype(self.dtype) if self.dtype else None
        return dt if isinstance(dt, torch.dtype) else None

    @property
    def default_dtype(self) -> str:
        return self.dtype or "auto"

    def stop_ids(self) -> list[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(int(i) for i in ids))

    def _new_tokens(self, ids: torch.Tensor, extra: dict[str, Any] | None, max_new_tokens: int,
                    stops: list[int]) -> list[int]:
        ex = dict(extra or {})
        if "pixel_values" in ex and (dt := self._torch_dtype()) is not None:
            ex["pixel_values"] = ex["pixel_values"].to(dt)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stops or [0])[0]
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=stops or None, pad_token_id=pad, **ex)
        return out[0, ids.shape[1]:].tolist()

    @abstractmethod
    def _encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        """A left-padded batch of rendered prompts (and their images) as model inputs."""

    def prompt_inputs(self, messages: Sequence[dict[str, str]], images: Sequence[str],
                      meta: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any] | None]:
        from mmtune.data.images import load_image

        if images and not self.takes_images:
            raise MMTuneError(f"{self.folder}: the model is text-only but the prompt has images")
        enc = self._encode([self.render(messages, meta)], [[load_image(p) for p in images]])
        ids = enc.pop("input_ids")[0].tolist()
        enc.pop("attention_mask", None)
        return ids, (dict(enc) or None)

    def generate(self, prompts: Sequence[Record], settings: DecodeSettings, *, progress: bool = False,
                 desc: str = "generate") -> list[str | PromptSkip]:
        from tqdm.auto import tqdm

        from mmtune.data.images import load_image

        batch_size, max_new_tokens = settings.batch_size, settings.max_new_tokens
        results: list[str | PromptSkip | None] = [None] * len(prompts)
        todo: list[tuple[int, str]] = []
        for i, rec in enumerate(prompts):
            check_prompt_record(rec)
            if rec.images and not self.takes_images:
                results[i] = PromptSkip("record has images but the model is text-only")
            else:
                todo.append((i, self.render(rec.messages, rec.meta)))
        model = self.model if todo else None
        limit = max_positions(getattr(model, "config", None))
        stops = self.stop_ids() if todo else []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stops or [0])[0]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        todo.sort(key=lambda t: len(t[1]))
        batches = [todo[j: j + batch_size] for j in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=False):
            rows, texts, imgs = [], [], []
            for i, text in batch:
                try:
                    loaded = [load_image(p) for p in prompts[i].images]
                except MMTuneError as exc:
                    results[i] = PromptSkip(f"image cannot be loaded ({exc})")
                    continue
                rows.append(i)
                texts.append(text)
                imgs.append(loaded)
            if not rows:
                continue
            enc = self._encode(texts, imgs)
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            keep = [r for r, n in enumerate(lengths) if limit is None or n + max_new_tokens <= limit]
            for r, n in enumerate(lengths):
                if r not in keep:
                    results[rows[r]] = PromptSkip("prompt too long for the model's context")
            if not keep:
                continue
            if len(keep) < len(rows):  # re-encode without the rows that do not fit
                rows = [rows[r] for r in keep]
                enc = self._encode([texts[r] for r in keep], [imgs[r] for r in keep])
            enc = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
            if "pixel_values" in enc and (dt := self._torch_dtype()) is not None:
                enc["pixel_values"] = enc["pixel_values"].to(dt)
            sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=settings.do_sample,
                                     eos_token_id=stops or None, pad_token_id=pad, **sampling)
            start = enc["input_ids"].shape[1]
            for r, i in enumerate(rows):
                new = out[r, start:].tolist()
                ends = [new.index(t) for t in stops if t in new]
                if ends:
                    new = new[: min(ends)]
                results[i] = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def release(self) -> None:
        self._model = None
        super().release()


class LlavaHFBackend(_HFBackend):
    """A `LlavaForConditionalGeneration` folder with its processor (chat template, image processor)."""

    kind = "llava-hf"
    hf_class = "LlavaForConditionalGeneration"

    def __init__(self, folder: Path, *, template: str | None, device: str, dtype: str | None,
                 image_backend: str | None = None, trust_remote_code: bool = False) -> None:
        super().__init__(folder, template=template, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code)
        from transformers import AutoProcessor

        try:
            # image_backend: "pil" or "torchvision" (transformers' default); `mmtune export` prints the one
            # that reproduces the exported model's training pixels exactly.
            kw = {"backend": image_backend} if image_backend else {}
            self.processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kw)
        except (OSError, ValueError) as exc:
            raise MMTuneError(f"{folder}: cannot load the processor ({str(exc).splitlines()[0]})") from None
        self.processor.tokenizer.padding_side = "left"
        self._choose_template(template, self.processor, "processor")

    @classmethod
    def matches(cls, path: Path) -> bool:
        cfg = _hf_config(path)
        return cfg is not None and (cfg.get("model_type") == "llava"
                                    or "LlavaForConditionalGeneration" in (cfg.get("architectures") or []))

    takes_images = True

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _own_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        conv = [{"role": m["role"], "content": _as_parts(m["content"])} for m in messages]
        return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)

    def _encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        flat = [im for row in images for im in row]
        special = _needs_special_tokens(texts[0], self.tokenizer)
        enc = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True,
                             add_special_tokens=special)
        return dict(enc)


class CausalLMBackend(_HFBackend):
    """A transformers causal-LM folder, prompted with its tokenizer's chat template (or an mmtune template)."""

    kind = "causal-lm"
    hf_class = "AutoModelForCausalLM"

    def __init__(self, folder: Path, *, template: str | None, device: str, dtype: str | None,
                 trust_remote_code: bool = False) -> None:
        super().__init__(folder, template=template, device=device, dtype=dtype,
                         trust_remote_code=trust_remote_code)
        self._tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        self._tokenizer.padding_side = "left"
        self._choose_template(template, self._tokenizer, "tokenizer", hint=" (e.g. vicuna_v1, chatml)")

    @classmethod
    def matches(cls, path: Path) -> bool:
        return _hf_config(path) is not None

    takes_images = False

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _own_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        special = _needs_special_tokens(texts[0], self._tokenizer)
        return dict(self._tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special))


# Detection order matters: an mmtune folder has no config.json; a llava folder is also a transformers folder.
BACKENDS: dict[str, type[EvalModel]] = {
    "mmtune": MMTuneBackend,
    "llava-hf": LlavaHFBackend,
    "causal-lm": CausalLMBackend,
}


def detect_backend(path: str | Path) -> str:
    """The id of the first backend whose `matches` accepts `path` (error naming the path otherwise)."""
    p = Path(path)
    if not p.exists():
        raise MMTuneError(f"{p}: no such model folder, checkpoint or run folder")
    for kind, cls in BACKENDS.items():
        if cls.matches(p):
            return kind
    raise MMTuneError(f"{p}: not an mmtune checkpoint/run (model_config.yaml) nor a transformers folder "
                      "(config.json)")


def open_model(path: str | Path, *, backend: str | None = None, template: str | None = None,
               device: str | None = None, dtype: str | None = None, image_backend: str | None = None,
               trust_remote_code: bool = False) -> EvalModel:
    """An `EvalModel` for `path` (backend detected unless named; see the module docstring).

    `image_backend` (llava-hf only): the processor's image backend, "pil" or "torchvision".
    `trust_remote_code`: the user's word, never the checkpoint's.
    """
    kind = backend or detect_backend(path)
    if kind not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(kind, list(BACKENDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MMTuneError(f"unknown model backend {kind!r}{hint} (have: {', '.join(BACKENDS)})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = {"image_backend": image_backend} if image_backend and kind == "llava-hf" else {}
    return BACKENDS[kind](Path(path), template=template, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code, **extra)
