"""Feature cache for frozen vision encoders: encode every image once, then train the bridge, projections and caption
decoder from the stored features instead of running the CNN/ViT every step (hours become minutes on a CPU).

Layout: `<root>/<encoder slug>-<fingerprint>/shard-<id>.safetensors`. The fingerprint hashes the encoder spec, its
weights, image size and normalisation, and the storage dtype, so a changed encoder gets a fresh directory. Inside,
each shard holds `tokens` [n, N, D] and `pooled` [n, D] and, in its metadata, the identity of each row's file: the
SHA-256 of its bytes (of the shard's, plus the offset, for tar members). A changed file no longer matches
and is encoded again; a copied, moved or touched one still does. `digests.json` remembers each path's digest with its
size and mtime, so files whose size and mtime have not changed are not read again (as git's index does).
Images that fail to decode are remembered with their reason, so later runs report them without decoding again.
Shards are written to a temporary file and renamed, so a killed encoder leaves only complete shards behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmstory.components import VisionEncoder
from mmstory.data import ImageCaptions, ImageRef, Key, Skipped, TarMember, item_name, open_image, skip_reason
from mmstory.files import atomic_write, atomic_write_text, file_stamp
from mmstory.images import MAX_PIXELS, ImageError, ImageProcessor

Location = tuple[str, int]  # (shard file, row)
DIGESTS_NAME = "digests.json"


def file_identity(image: ImageRef, digests: dict[str, list] | None = None) -> str:
    """What makes a cached entry valid: the file's content digest (raises OSError). `digests` (path -> [size, mtime,
    digest]) spares reading a file whose size and mtime are those it was last hashed with."""
    path = image.shard if isinstance(image, TarMember) else Path(image)
    key, *seen = file_stamp(path)
    known = (digests or {}).get(key)
    if known is not None and known[:2] == seen:
        digest = known[2]
    else:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digests is not None:
            digests[key] = [*seen, digest]
    return f"{digest}#{image.offset}" if isinstance(image, TarMember) else digest


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors' exact bytes (identifies weights independently of file names)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_fingerprint(vision: VisionEncoder, spec: str, dtype: torch.dtype) -> dict:
    """Everything that changes the features: spec, weights, input size, normalisation, storage dtype."""
    return {"spec": spec, "weights_sha256": tensors_sha256(vision.state_dict()), "image_size": vision.image_size,
            "mean": vision.mean, "std": vision.std, "dtype": str(dtype).removeprefix("torch.")}


@dataclass
class CachedFeatures:
    """The images of a record list that have features, where those live, and what was skipped."""

    records: list[ImageCaptions]
    locations: list[Location]
    skipped: list[Skipped]
    encoded: int
    reused: int
    seconds: float

    def dataset(self, text: TextFeatures | None = None) -> FeatureDataset:
        return FeatureDataset(self.records, self.locations, text)


class FeatureCache:
    """Encoded features of one frozen vision encoder, shared by every run that uses it."""

    def __init__(self, root: str | Path, vision: VisionEncoder, spec: str, dtype: torch.dtype = torch.float16,
                 shard_size: int = 1024, max_pixels: int = MAX_PIXELS):
        self.vision, self.dtype, self.shard_size, self.max_pixels = vision, dtype, shard_size, max_pixels
        self.fingerprint = encoder_fingerprint(vision, spec, dtype)
        key = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(root) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}-{key}"

    def index(self) -> tuple[dict[str, Location], dict[str, str]]:
        """Scan the shards' metadata: identity -> (shard, row) for encoded images, identity -> reason for bad ones."""
        found: dict[str, Location] = {}
        bad: dict[str, str] = {}
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), "pt") as handle:
                meta = handle.metadata() or {}
            for row, identity in enumerate(json.loads(meta.get("identities", "[]"))):
                found[identity] = (str(shard), row)
            bad.update(json.loads(meta.get("bad", "{}")))
        return found, bad

    def build(self, records: Sequence[ImageCaptions], *, batch_size: int = 64, num_workers: int = 0,
              device: str | torch.device = "cpu", progress: bool = True) -> CachedFeatures:
        """Encode the images not cached yet (batched, no autograd) and return every record's features location."""
        start = time.perf_counter()
        identities: list[str | None] = []
        skipped: list[Skipped] = []
        digests = self._digests()
        before = dict(digests)
        for record in records:
            try:
                identities.append(file_identity(record.image, digests))
            except OSError as error:  # its bytes are read now, so a file without read permission fails here
                identities.append(None)
                reason = "no such file" if isinstance(error, FileNotFoundError) else f"unreadable: {error.strerror}"
                skipped.append(Skipped(item_name(record.image), reason))
        if digests != before:
            self._save_digests(digests)
        found, bad = self.index()
        todo = sorted({i: n for n, i in enumerate(identities) if i and i not in found and i not in bad}.values())
        reused = sum(1 for i in identities if i and (i in found or i in bad))
        if todo:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "encoder.json").write_text(json.dumps(self.fingerprint, indent=2) + "\n")
            self._encode([records[n].image for n in todo], [identities[n] for n in todo], batch_size, num_workers,
                         device, progress)
            found, bad = self.index()
        kept, locations = [], []
        for record, identity in zip(records, identities):
            if identity is None:
                continue
            if identity in found:
                kept.append(record)
                locations.append(found[identity])
            else:
                skipped.append(Skipped(item_name(record.image), bad.get(identity, "not encoded")))
        return CachedFeatures(kept, locations, skipped, encoded=len(todo), reused=reused,
                              seconds=time.perf_counter() - start)

    def _digests(self) -> dict[str, list]:
        try:
            return json.loads((self.directory / DIGESTS_NAME).read_text())
        except (OSError, ValueError):  # none yet, or unreadable: files are hashed again
            return {}

    def _save_digests(self, digests: dict[str, list]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / DIGESTS_NAME, json.dumps(digests),  # runs sharing the cache each
                          tmp_name=f".tmp-{uuid.uuid4().hex[:12]}.json")  # write a whole file

    @torch.no_grad()
    def _encode(self, images: list[ImageRef], identities: list[str], batch_size: int, num_workers: int,
                device: str | torch.device, progress: bool) -> None:
        vision = self.vision.to(device).eval()
        vision.to(memory_format=torch.channels_last)  # CNNs such as EfficientNet-Lite run faster in NHWC on CPU
        processor = ImageProcessor(vision.image_size, vision.mean, vision.std)
        # its own generator: encoding must not draw from the global RNG, or a run that builds its cache would train
        # differently from one that finds it built
        loader = DataLoader(_DecodeDataset(images, processor, self.max_pixels), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate_decoded, generator=torch.Generator())
        pending = _Pending()
        try:
            for batch in tqdm(loader, desc="encoding features", unit="batch", disable=not progress):
                for n, reason in batch["bad"]:
                    pending.bad[identities[n]] = reason
                if batch["indices"]:
                    pixels = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
                    tokens, pooled = vision(pixels)
                    pending.add([identities[n] for n in batch["indices"]], tokens.to(self.dtype).cpu(),
                                pooled.to(self.dtype).cpu())
                if pending.size() >= self.shard_size:
                    self._write(pending)
                    pending = _Pending()
            if pending.size():
                self._write(pending)
        finally:
            vision.to(memory_format=torch.contiguous_format)

    def _write(self, pending: _Pending) -> None:
        tokens = torch.cat(pending.tokens) if pending.tokens else torch.zeros(0, 1, 1, dtype=self.dtype)
        pooled = torch.cat(pending.pooled) if pending.pooled else torch.zeros(0, 1, dtype=self.dtype)
        name = uuid.uuid4().hex[:12]
        atomic_write(self.directory / f"shard-{name}.safetensors",
                     lambda tmp: save_file({"tokens": tokens.contiguous(), "pooled": pooled.contiguous()}, str(tmp),
                                           metadata={"identities": json.dumps(pending.identities),
                                                     "bad": json.dumps(pending.bad)}),
                     tmp_name=f".tmp-{name}.safetensors")


@dataclass
class TextFeatures:
    """Pooled text-encoder features for a set of captions: `table[lookup[caption]]`."""

    lookup: dict[str, int]
    table: torch.Tensor
    encoded: int
    seconds: float

    def __getitem__(self, caption: str) -> torch.Tensor:
        return self.table[self.lookup[caption]]


def text_features(root: str | Path, encode: Callable[[list[str]], torch.Tensor], fingerprint: dict,
                  captions: Sequence[str], batch_size: int = 256, dtype: torch.dtype = torch.float16,
                  progress: bool = True) -> TextFeatures:
    """Encode every distinct caption once with a frozen text encoder, or load the file an earlier run wrote.

    The file is named by the encoder's fingerprint and the caption set, so any change gives a fresh one.
    """
    start = time.perf_counter()
    unique = sorted(set(captions))
    key = hashlib.sha256(json.dumps([fingerprint, unique], sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(fingerprint.get("spec", "text")))
    path = Path(root) / f"text-{slug}" / f"{key}.safetensors"
    lookup = {caption: i for i, caption in enumerate(unique)}
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            return TextFeatures(lookup, handle.get_tensor("features"), 0, time.perf_counter() - start)
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))  # similar lengths per batch: little padding
    table = None
    with torch.no_grad():
        for begin in tqdm(range(0, len(order), batch_size), desc="encoding captions", unit="batch",
                          disable=not progress):
            rows = order[begin: begin + batch_size]
            features = encode([unique[i] for i in rows]).to(dtype).cpu()
            if table is None:
                table = torch.zeros(len(unique), features.shape[1], dtype=dtype)
            table[rows] = features
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"features": table.contiguous()}, str(tmp),
                                             metadata={"fingerprint": json.dumps(fingerprint)}),
                 tmp_name=f".tmp-{uuid.uuid4().hex[:12]}.safetensors")
    return TextFeatures(lookup, table, len(unique), time.perf_counter() - start)


class FeatureDataset(Dataset):
    """Cached (tokens, pooled, caption) samples, indexed like `ImageTextDataset` by (record, caption) keys.

    Shards are memory-mapped lazily in each process (DataLoader workers open their own handles).
    """

    def __init__(self, records: Sequence[ImageCaptions], locations: Sequence[Location],
                 text: TextFeatures | None = None):
        if not records:
            raise ValueError("the feature dataset has no records")
        self.records, self.locations, self.text = list(records), list(locations), text
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(shard, "pt")
        return self._handles[shard]

    def features(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, row = self.locations[index]
        handle = self._handle(shard)
        return handle.get_slice("tokens")[row], handle.get_slice("pooled")[row]

    def __getitem__(self, key: Key) -> dict:
        index, caption_index = key
        record = self.records[index]
        tokens, pooled = self.features(index)
        caption = record.captions[caption_index % len(record.captions)]
        sample = {"image_tokens": tokens, "image_pooled": pooled, "caption": caption, "name": item_name(record.image),
                  "skipped": []}
        if self.text is not None:
            sample["text_pooled"] = self.text[caption]
        return sample


def collate_features(samples: list[dict]) -> dict:
    batch = {"image_tokens": torch.stack([s["image_tokens"] for s in samples]).float(),
             "image_pooled": torch.stack([s["image_pooled"] for s in samples]).float(),
             "captions": [s["caption"] for s in samples], "names": [s["name"] for s in samples],
             "skipped": [item for s in samples for item in s["skipped"]]}
    if "text_pooled" in samples[0]:
        batch["text_pooled"] = torch.stack([s["text_pooled"] for s in samples]).float()
    return batch


class _DecodeDataset(Dataset):
    def __init__(self, images: list[ImageRef], processor: ImageProcessor, max_pixels: int):
        self.images, self.processor, self.max_pixels = images, processor, max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, n: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return n, self.processor(open_image(self.images[n], self.max_pixels)), None
        except ImageError as err:
            return n, None, skip_reason(err, self.images[n])


def _collate_decoded(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict:
    good = [(n, pixels) for n, pixels, _ in items if pixels is not None]
    return {"indices": [n for n, _ in good], "pixel_values": torch.stack([p for _, p in good]) if good else None,
            "bad": [(n, reason) for n, pixels, reason in items if pixels is None]}


class _Pending:
    """Rows waiting to be written as one shard."""

    def __init__(self):
        self.identities: list[str] = []
        self.tokens: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []
        self.bad: dict[str, str] = {}

    def add(self, identities: list[str], tokens: torch.Tensor, pooled: torch.Tensor) -> None:
        self.identities.extend(identities)
        self.tokens.append(tokens)
        self.pooled.append(pooled)

    def size(self) -> int:
        return len(self.identities) + len(self.bad)
