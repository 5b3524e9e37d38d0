"""Captions written by a local model: `imglora-data caption DIR --model MODEL_DIR`, and the same from Python.

Two kinds of model folder, told apart by their files; nothing is ever downloaded and no model code from
the folder is run (no trust_remote_code):

- a transformers captioner (`config.json`, safetensors weights and its processor files): BLIP, BLIP-2,
  Florence-2 (the transformers-native conversion), Qwen2-VL, Qwen2.5-VL and LLaVA (JoyCaption is one);
- a WD tagger from SmilingWolf (`model.onnx` + `selected_tags.csv`), run with onnxruntime.

    captioner = load_captioner("models/wd-vit-tagger-v3", threshold=0.4)
    captioner.caption([Image.open("a.png")])        # -> ["1girl, solo, smile"]
    caption_folder("data", captioner, trigger="sks")  # writes the missing sidecar captions
"""

from __future__ import annotations

import csv
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imglora.data.captions import CAPTION_EXTENSIONS, add_prefix, metadata_captions, read_caption, sidecar, walk
from imglora.data.images import load_image, to_rgb
from imglora.errors import ImgloraError, shell_word, shown

from .caption import Backup

CHAT_PROMPT = "Write a one-sentence caption for this image: the subject, its look, the setting and the style."
# model_type -> (the class that generates text, name, how the prompt is given, default prompt)
MODELS = {
    "blip": ("BlipForConditionalGeneration", "BLIP", "prefix", None),
    "blip-2": ("Blip2ForConditionalGeneration", "BLIP-2", "prefix", None),
    "florence2": ("Florence2ForConditionalGeneration", "Florence-2", "task", "<DETAILED_CAPTION>"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2-VL", "chat", CHAT_PROMPT),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL", "chat", CHAT_PROMPT),
    "llava": ("LlavaForConditionalGeneration", "LLaVA", "chat", CHAT_PROMPT),
}
GENERATOR_OPTIONS = {"prompt", "max_new_tokens", "min_new_tokens", "num_beams", "device", "dtype"}
TAGGER_OPTIONS = {"threshold", "character_threshold", "exclude_tags", "replace_underscores", "max_tags", "ratings",
                  "device"}
EXISTING = ("skip", "overwrite", "append")
DOWNLOAD_HINT = "models are never downloaded: get the folder first, e.g. `hf download ORG/NAME --local-dir DIR`"
# WD tags that are faces, not words: their underscores stay (SmilingWolf's reference tagger keeps them too)
KAOMOJIS = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
            "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}
RATING, CHARACTER = 9, 4  # selected_tags.csv categories; everything else is thresholded as a general tag


def detect_model(path) -> tuple[str, dict | None]:
    """("tagger", None) or (model_type, config) for a model folder; anything else is a one-line ImgloraError
    naming the folder and what is missing. Reads only small files (configs, safetensors headers)."""
    path = Path(path)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # a Hub name, not a folder
            raise ImgloraError("no such model folder", f"models are never downloaded: get it first with "
                               f"`hf download {path} --local-dir models/{path.name}`", path=path)
        raise ImgloraError("no such model folder", DOWNLOAD_HINT, path=path)
    if not path.is_dir():
        raise ImgloraError("is a file, not a model folder", "pass the folder that holds config.json, or model.onnx "
                           "and selected_tags.csv", path=path)
    onnx, tags = path / "model.onnx", path / "selected_tags.csv"
    if onnx.exists() or tags.exists():
        for have, need in ((onnx, tags), (tags, onnx)):
            if have.exists() and not need.is_file():
                raise ImgloraError(f"missing {need.name} (a WD tagger folder holds model.onnx and selected_tags.csv)",
                                   "download both files of the tagger", path=path)
        _not_an_lfs_pointer(onnx)
        return "tagger", None
    if not (path / "config.json").is_file():
        what = "a diffusers pipeline" if (path / "model_index.json").is_file() else "not a captioning model"
        raise ImgloraError(f"{what}: found neither config.json (a transformers captioner) nor model.onnx + "
                           "selected_tags.csv (a WD tagger)", "pass a captioner's folder; " + DOWNLOAD_HINT, path=path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ImgloraError(f"config.json is not valid JSON ({e})", "download it again", path=path) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODELS:
        raise ImgloraError(f"model_type {model_type!r} is not a captioner imglora runs",
                           f"use one of: {', '.join(MODELS)}, or a WD tagger", path=path)
    architecture = MODELS[model_type][0]
    if config.get("architectures") and architecture not in config["architectures"]:
        raise ImgloraError(f"is a {config['architectures'][0]}, which does not write captions",
                           f"use a {architecture} model", path=path)
    text_type = (config.get("text_config") or {}).get("model_type")
    if model_type == "florence2" and text_type == "florence2_language":
        raise ImgloraError("the original Florence-2, which needs its own remote code (never run here)",
                           "use the transformers conversion, e.g. florence-community/Florence-2-large", path=path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")]
        raise ImgloraError("missing model.safetensors" + (f" (only {pickles[0]}, a PyTorch pickle, which imglora "
                           "does not load)" if pickles else ""), "download the safetensors weights", path=path)
    from imglora.formats.files import read_header

    for w in weights:
        read_header(w)  # a Git LFS pointer or a cut-off download: one line naming the file
    if not any((path / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        raise ImgloraError("missing preprocessor_config.json (the image processor)", "download the whole model "
                           "repository", path=path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ImgloraError("missing tokenizer.json (the tokenizer)", "download the whole model repository", path=path)
    return model_type, config


def _not_an_lfs_pointer(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(24).startswith(b"version https://git-lfs"):
            raise ImgloraError("a Git LFS pointer, not the file itself", "run `git lfs pull` in its repository",
                               path=path)


def load_captioner(path, **options):
    """A Tagger or a Generator for a model folder. Options (None means the default; one that does not apply
    to the folder's kind is an error): prompt, max_new_tokens, min_new_tokens, num_beams, dtype for
    transformers models; threshold, character_threshold, exclude_tags, replace_underscores, max_tags,
    ratings for taggers; device for both."""
    kind, config = detect_model(path)
    given = _options_for(kind, options, path)
    if kind == "tagger":
        return Tagger(path, **given)
    return Generator(path, config, **given)


def _options_for(kind: str, options: dict, path) -> dict:
    """The options that were given (not None), refusing those of the other kind of model."""
    unknown = set(options) - GENERATOR_OPTIONS - TAGGER_OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(set(given) - (TAGGER_OPTIONS if kind == "tagger" else GENERATOR_OPTIONS))
    if wrong:
        what = "a WD tagger" if kind == "tagger" else f"a {MODELS[kind][1]} captioner"
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        other = "transformers captioners" if kind == "tagger" else "WD taggers"
        raise ImgloraError(f"{flags}: only for {other}, and this is {what}", "leave it out", path=path)
    return given


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ImgloraError(f"--device {device!r} is not a device", "use auto, cpu, cuda, cuda:1 or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ImgloraError(f"--device {device}: no CUDA GPU here", "use --device cpu")
    return device


DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | None, device: str):
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.startswith("mps") else torch.float32  # half on a CPU is slow, not smaller
    if dtype not in DTYPES:
        raise ImgloraError(f"--dtype {dtype!r}", "use auto, float32, float16 or bfloat16")
    return getattr(torch, DTYPES[dtype])


def _load_processor(path, model_type: str):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    if "video_processor" in cls.get_attributes():
        # Qwen-VL processors also load a video processor, and those need torchvision, which imglora does not
        # install; captions need only the image processor and the tokenizer.
        base = cls

        class ImageOnly(base):
            @classmethod
            def get_attributes(klass):
                return [a for a in base.get_attributes() if a != "video_processor"]

        cls = ImageOnly
    return cls.from_pretrained(str(path), local_files_only=True)


class Generator:
    """A transformers image-to-text model. Greedy (or beam) decoding: the same images give the same captions."""

    tags = False  # captions are free text

    def __init__(self, path, config: dict, prompt: str | None = None, max_new_tokens: int | None = None,
                 min_new_tokens: int | None = None, num_beams: int | None = None, device: str | None = None,
                 dtype: str | None = None):
        import torch
        import transformers

        model_type = config["model_type"]
        architecture, self.name, self.style, default_prompt = MODELS[model_type]
        self.prompt = default_prompt if prompt is None else prompt
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.default_batch_size = 8 if self.device.startswith("cuda") else 2
        try:
            self.processor = _load_processor(path, model_type)
            self.model = getattr(transformers, architecture).from_pretrained(  # straight onto the device
                str(path), dtype=self.dtype, device_map=self.device, local_files_only=True, use_safetensors=True)
            self.model.eval()
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError) as e:
            line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ImgloraError(f"cannot load the {self.name} model ({line})", "download the whole model repository "
                               "again", path=path) from e
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:  # Llama's tokenizer has none, and a batch needs one
            tokenizer.pad_token = tokenizer.eos_token
        if self.style != "task":  # decoder-only text models continue from the right: pad batches on the left
            tokenizer.padding_side = "left"
        if self.model.generation_config.pad_token_id is None:  # else generate() warns on every batch
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.model.generation_config.pad_token_id = pad
        self.generate_args = dict(max_new_tokens=max_new_tokens or 96, num_beams=num_beams or 1, do_sample=False)
        if min_new_tokens:
            self.generate_args["min_new_tokens"] = min_new_tokens
        self._chat_text = self._chat(self.prompt) if self.style == "chat" else None
        self._torch = torch

    def _chat(self, prompt: str) -> str:
        """The prompt in the model's chat template, with the image in it exactly once. Templates differ in how
        they take the image: some put its token in themselves (JoyCaption), some take it as a content part
        (Qwen, llava-hf), some not at all (then its token goes before the prompt)."""
        p = self.processor
        image_token = getattr(p, "image_token", None) or "<image>"
        if not getattr(p, "chat_template", None):
            return f"USER: {image_token}\n{prompt} ASSISTANT:"  # LLaVA-1.5's format
        for content in (prompt, [{"type": "image"}, {"type": "text", "text": prompt}], f"{image_token}\n{prompt}"):
            try:
                text = p.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
            except Exception:  # jinja errors: a template that takes only string content, or only parts
                continue
            if text.count(image_token) == 1:
                return text
        raise ImgloraError("the model's chat template leaves out the image", "use a model whose processor has a "
                           "vision chat template")

    def _inputs(self, images: list[Image.Image]):
        n = len(images)
        kwargs = dict(images=images, return_tensors="pt")
        if self.style == "chat":
            tokenizer = self.processor.tokenizer
            text = self._chat_text
            # a template that writes the BOS token itself: do not add a second one
            kwargs.update(text=[text] * n, padding=True,
                          add_special_tokens=not (tokenizer.bos_token and text.startswith(tokenizer.bos_token)))
        elif self.prompt:
            kwargs.update(text=[self.prompt] * n, padding=True)
        inputs = self.processor(**kwargs)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if hasattr(v, "to")}

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        torch = self._torch
        inputs = self._inputs([to_rgb(im) for im in images])
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, **self.generate_args)
        except torch.OutOfMemoryError:
            raise ImgloraError(f"out of memory captioning {len(images)} image(s) at once", "use a smaller "
                               "--batch-size (captions written so far are kept)") from None
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # decoder-only models return the prompt before the caption
        texts = [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        if self.style == "prefix" and self.prompt:
            # BLIP returns its text prefix with the caption ("a photo of" + "a dog"); the caption is what follows
            lead = " ".join(self.prompt.split()).lower()
            texts = [t[len(lead):].strip() if t.lower().startswith(lead) else t for t in texts]
        return texts


class Tagger:
    """A SmilingWolf WD tagger (wd-v1-4-*, wd-*-tagger-v3) as ONNX: NHWC BGR float 0-255 in, one score per
    row of selected_tags.csv out. Preprocessing follows SmilingWolf's reference: flatten onto white, pad to
    a square with white, resize (bicubic) to the model's side, RGB to BGR."""

    tags = True  # captions are ", "-joined tags
    name = "WD tagger"
    default_batch_size = 16

    def __init__(self, path, threshold: float = 0.35, character_threshold: float = 0.85, exclude_tags=(),
                 replace_underscores: bool = True, max_tags: int | None = None, ratings: bool = False,
                 device: str | None = None):
        import onnxruntime as ort

        path = Path(path)
        for name, value in (("threshold", threshold), ("character-threshold", character_threshold)):
            if not 0 <= value <= 1:
                raise ImgloraError(f"--{name} {value} is not between 0 and 1", "e.g. 0.35")
        self.threshold, self.character_threshold = threshold, character_threshold
        self.max_tags, self.ratings = max_tags, ratings
        names, self.categories = read_selected_tags(path / "selected_tags.csv")
        self.names = [n if n in KAOMOJIS or not replace_underscores else n.replace("_", " ") for n in names]
        if isinstance(exclude_tags, str):
            exclude_tags = exclude_tags.split(",")
        self.exclude = {_tag_key(t) for t in exclude_tags}
        providers = _onnx_providers(device)
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), providers=providers)
        except Exception as e:  # onnxruntime raises its own error types for a damaged or foreign file
            line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ImgloraError(f"cannot load model.onnx ({line})", "download it again", path=path / "model.onnx") from e
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[3] != 3:
            raise ImgloraError(f"model.onnx takes input of shape {shape}, not images (batch, height, width, 3)",
                               "use a SmilingWolf WD tagger (wd-v1-4-*, wd-*-tagger-v3)", path=path / "model.onnx")
        self.size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else 448
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(names):
            raise ImgloraError(f"model.onnx gives {outputs[-1]} scores but selected_tags.csv names {len(names)} tags",
                               "use the selected_tags.csv that came with the model", path=path)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)  # transparency onto white
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR, as the taggers were trained

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """(images, tags) confidences, in selected_tags.csv order."""
        if not images:
            return np.zeros((0, len(self.names)), np.float32)
        batch = np.ascontiguousarray(np.stack([self.preprocess(im) for im in images]))
        feed = self.session.get_inputs()[0].name
        step = self.fixed_batch or len(batch)  # a model exported for a fixed batch size runs in pieces of it
        out = []
        for i in range(0, len(batch), step):
            piece = batch[i:i + step]
            if len(piece) < step:
                piece = np.concatenate([piece, np.repeat(piece[-1:], step - len(piece), axis=0)])
            out.append(self.session.run(None, {feed: piece})[0][:len(batch) - i])
        return np.concatenate(out)

    def tags_of(self, images: list[Image.Image]) -> list[list[tuple[str, float]]]:
        """Per image: [(tag, confidence)], the rating first (with `ratings`), then character tags, then general
        tags, each by confidence; excluded tags left out; at most max_tags."""
        result = []
        for row in self.scores(images):
            picked = {RATING: [], CHARACTER: [], 0: []}
            for i, p in enumerate(row):
                cat = self.categories[i]
                kind = cat if cat in (RATING, CHARACTER) else 0
                limit = self.character_threshold if kind == CHARACTER else self.threshold
                if (kind == RATING or p >= limit) and _tag_key(self.names[i]) not in self.exclude:
                    picked[kind].append((self.names[i], float(p)))
            ratings = sorted(picked[RATING], key=lambda t: -t[1])[:1] if self.ratings else []
            tags = ratings + sorted(picked[CHARACTER], key=lambda t: -t[1]) + sorted(picked[0], key=lambda t: -t[1])
            result.append(tags[:self.max_tags] if self.max_tags else tags)
        return result

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [", ".join(name for name, _ in tags) for tags in self.tags_of(images)]


def _tag_key(tag: str) -> str:
    """`long_hair`, `Long Hair` and ` long hair ` are one tag when excluding."""
    return " ".join(tag.replace("_", " ").lower().split())


def read_selected_tags(path: Path) -> tuple[list[str], list[int]]:
    """(names, categories) of a WD tagger's selected_tags.csv (columns tag_id,name,category,count)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ImgloraError(f"unreadable selected_tags.csv ({e})", "download it again", path=path) from None
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise ImgloraError("not a tag list (no name and category columns)", "download selected_tags.csv again",
                           path=path)
    try:
        return [r["name"] for r in rows], [int(r["category"]) for r in rows]
    except (TypeError, ValueError):
        raise ImgloraError("a category that is not a number", "download selected_tags.csv again", path=path) from None


def _onnx_providers(device: str | None) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in (None, "auto"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available \
            else ["CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ImgloraError(f"--device {device}: this onnxruntime has no CUDA support",
                               "install onnxruntime-gpu, or use --device cpu")
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ImgloraError(f"--device {device!r} for a tagger", "use auto, cpu or cuda")


@dataclass
class FolderResult:
    changes: list[tuple[Path, str | None, str]] = field(default_factory=list)  # (caption file, old, new) written
    skipped: list[Path] = field(default_factory=list)  # images that already had a caption
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, why): unreadable, empty caption
    notes: list[str] = field(default_factory=list)
    backup: Path | None = None  # where the originals went (None: nothing replaced or created, or a dry run)
    interrupted: bool = False  # Ctrl-C: what `changes` lists was written, the rest was not
    left: int = 0  # images without a caption that `limit` left for another run


def combine(old: str | None, text: str, existing: str, trigger: str | None, tags: bool) -> str:
    """The caption to write: the model's text, after the old caption with `append`, the trigger first."""
    if existing == "append" and old:
        if tags:  # only the tags the caption lacks
            have = {_tag_key(t) for t in old.split(",")}
            extra = [t for t in text.split(", ") if _tag_key(t) not in have]
            text = ", ".join([old, *extra])
        else:
            text = old if text in old else f"{old}, {text}"
    if not trigger:
        return text
    if tags:
        rest = [t for t in text.split(", ") if t.strip() != trigger]
        return ", ".join([trigger, *rest])
    return add_prefix(text, trigger)


def plan_folder(root, existing: str = "skip", extension: str = ".txt"):
    """([(image, caption file, old caption or None)] to caption, images skipped, notes). Reads captions only."""
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {EXISTING}")
    if not extension.startswith(".") or "/" in extension:
        raise ImgloraError(f"--extension {extension!r}", "use e.g. --extension .txt")
    root = Path(root)
    found = walk(root, contained=True)  # a linked folder elsewhere (another dataset) is never written into
    in_jsonl = metadata_captions(found.metadata)
    todo, skipped, kept_jsonl = [], [], 0
    for image in found.images:
        side = sidecar(image, tuple(dict.fromkeys((extension, *CAPTION_EXTENSIONS))))
        old = read_caption(side) if side is not None else None  # a non-UTF-8 caption stops before the model loads
        if side is None and image in in_jsonl:
            skipped.append(image)  # a sidecar would hide its metadata.jsonl caption from the trainer
            kept_jsonl += existing != "skip"
        elif old and existing == "skip":
            skipped.append(image)
        else:
            todo.append((image, side or image.with_suffix(extension), old))
    notes = [f"{kept_jsonl} image(s) captioned in metadata.jsonl were left alone; `imglora-data convert --to "
             "sidecar` first to recaption them"] if kept_jsonl else []
    notes += [f"folder {shown(p)}: skipped, {why}" for p, why in found.skipped]
    return todo, skipped, notes


def caption_folder(root, model, *, existing: str = "skip", trigger: str | None = None, extension: str = ".txt",
                   batch_size: int | None = None, limit: int | None = None, dry_run: bool = False,
                   progress: bool = True, options: dict | None = None, workers: int = 4) -> FolderResult:
    """Caption the images under `root` that have no caption (existing="skip"), or all of them ("overwrite"
    replaces a caption, "append" adds after it). `model` is a captioner from load_captioner, or a model folder:
    checked first and loaded with `options` only if some image needs a caption. Captions are written a batch
    at a time, atomically, with the originals backed up as `imglora-data caption` does (`--restore` undoes
    them); dry_run writes nothing and returns what would be written. limit: caption at most this many images."""
    root = Path(root)
    todo, skipped, notes = plan_folder(root, existing, extension)
    result = FolderResult(skipped=skipped, notes=notes)
    if limit:
        result.left, todo = max(0, len(todo) - limit), todo[:limit]
    if isinstance(model, (str, Path)):
        _options_for(detect_model(model)[0], options or {}, model)  # bad input fails before any work
        if not todo:
            return result
        model = load_captioner(model, **(options or {}))
    if not todo:
        return result
    from tqdm import tqdm

    size = batch_size or model.default_batch_size
    backup = None if dry_run else Backup(root)
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, disable=not progress,
               mininterval=0.25, dynamic_ncols=True)

    def load(item):
        try:
            return load_image(item[0])
        except ImgloraError as e:
            return e

    try:
        with bar, ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(todo), size):
                batch, images = [], []
                for item, image in zip(todo[start:start + size], pool.map(load, todo[start:start + size])):
                    if isinstance(image, ImgloraError):
                        result.failed.append((item[0], image.what))
                    else:
                        batch.append(item)
                        images.append(image)
                changes = []
                for (image, side, old), text in zip(batch, model.caption(images)):
                    text = " ".join(text.split())  # one line, as caption files are
                    if not text:
                        result.failed.append((image, "the model gave an empty caption"))
                        continue
                    new = combine(old, text, existing, trigger, model.tags)
                    if new == old:
                        result.skipped.append(image)
                    else:
                        changes.append((side, old, new))
                if backup is not None:
                    backup.write(changes)
                result.changes += changes
                bar.update(len(todo[start:start + size]))
    except KeyboardInterrupt:
        result.interrupted = True
    result.backup = backup.folder if backup is not None else None
    return result


def summary(root, result: FolderResult, existing: str, dry_run: bool) -> str:
    """The one line the CLI ends with."""
    n = len(result.changes)
    line = f"{n} image(s) {'would be captioned' if dry_run else 'captioned'}, {len(result.skipped)} skipped"
    if result.skipped and existing == "skip":
        line += " (already captioned; --overwrite or --append to redo them)"
    if result.failed:
        line += f", {len(result.failed)} failed"
    if result.left:
        line += f", {result.left} left (--limit)"
    line += f"; captions beside the images in {shown(root)}"
    if dry_run:
        line += " (dry run: nothing written)"
    elif result.backup:
        line += (f"; originals in {shown(result.backup)} (undo: imglora-data caption {shell_word(root)} "
                 f"--restore {shell_word(result.backup)})")
    if result.interrupted:
        line += "; interrupted: run it again to caption the rest"
    return line
