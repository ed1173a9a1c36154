"""Tests of napari_sam.models: registry, resolution, verified download, loading.

Real torch and segment_anything code throughout; the tiny SAMs of napari_sam.testing
stand in for the real checkpoints, served from a local HTTP server where a download is
tested.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from napari_sam._errors import CheckpointError, ChecksumError, DownloadError, InvalidInputError
from napari_sam.models import (
    OFFICIAL_ARCHITECTURES,
    REGISTRY,
    Architecture,
    ModelSpec,
    build_sam,
    cache_dir,
    choose_device,
    default_model_name,
    infer_architecture,
    list_models,
    load_model,
    resolve_checkpoint,
)
from napari_sam.models import download as _download
from napari_sam.testing import make_tiny_checkpoint, make_tiny_sam

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no user settings."""
    monkeypatch.setenv("NAPARI_SAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NAPARI_SAM_CHECKPOINTS", raising=False)
    monkeypatch.delenv("NAPARI_SAM_MODEL", raising=False)


@pytest.fixture(scope="module")
def tiny_sd():
    return make_tiny_sam().state_dict()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_sd):
    path = tmp_path / "src" / "tiny.pth"
    path.parent.mkdir()
    torch.save(tiny_sd, path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_spec(monkeypatch, tiny_ckpt):
    """A registry entry 'tiny' (architecture checked against a tiny official one)."""
    spec = ModelSpec("tiny", "http://127.0.0.1:9/never.pth", sha256_of(tiny_ckpt), "tiny", "test", "tiny_ckpt.pth")
    monkeypatch.setitem(REGISTRY, "tiny", spec)
    monkeypatch.setitem(OFFICIAL_ARCHITECTURES, "tiny", infer_architecture(torch.load(tiny_ckpt)))
    return spec


def encode(sam: Sam, seed: int = 1) -> torch.Tensor:
    size = sam.image_encoder.img_size
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255
    with torch.no_grad():
        return sam.image_encoder(sam.preprocess(x))


# ----------------------------------------------------------------- architecture


def test_architecture_properties():
    vit_b = Architecture(768, 12, 12, (2, 5, 8, 11))
    assert vit_b.name == "vit_b" and vit_b.embedding_size == 64
    assert Architecture(1280, 32, 16, (7, 15, 23, 31)).name == "vit_h"
    tiny = Architecture(32, 2, 2, (1,), image_size=512)
    assert tiny.name == "custom" and tiny.embedding_size == 32
    d = json.loads(json.dumps(tiny.to_dict()))
    assert d["encoder_global_attn_indexes"] == [1] and d["image_size"] == 512
    assert Architecture(**{**d, "encoder_global_attn_indexes": tuple(d["encoder_global_attn_indexes"])}) == tiny


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_build_sam_matches_segment_anything_builder(name):
    """Same parameter names and shapes as segment_anything's own builders (meta tensors)."""
    with torch.device("meta"):
        theirs = sam_model_registry[name]().state_dict()
        ours = build_sam(OFFICIAL_ARCHITECTURES[name]).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert infer_architecture(theirs).name == name


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(0, 2)),
        dict(embed_dim=64, depth=4, num_heads=4, global_attn_indexes=()),
        dict(image_size=512, global_attn_indexes=(0,)),
        dict(image_size=512, embed_dim=48, num_heads=4, depth=3, window_size=8, global_attn_indexes=(2,)),
        dict(prompt_embed_dim=128),
    ],
)
def test_tiny_checkpoints_round_trip(tmp_path, kwargs):
    path = make_tiny_checkpoint(tmp_path / "t.pth", **kwargs)
    model = load_model(checkpoint=path, device="cpu", progress=False)
    a = model.architecture
    assert a.encoder_embed_dim == kwargs.get("embed_dim", 32)
    assert a.encoder_depth == kwargs.get("depth", 2)
    assert a.encoder_num_heads == kwargs.get("num_heads", 2)
    assert a.encoder_global_attn_indexes == kwargs.get("global_attn_indexes", (1,))
    assert a.image_size == model.image_size == kwargs.get("image_size", 1024)
    assert a.prompt_embed_dim == kwargs.get("prompt_embed_dim", 256)
    if a.encoder_depth > len(a.encoder_global_attn_indexes):
        assert a.window_size == kwargs.get("window_size", 14)
    assert model.name == "t.pth" and model.checkpoint_path == path and model.device == CPU
    assert model.checkpoint_sha256 == sha256_of(path)
    assert not model.sam.training
    assert not any(p.requires_grad for p in model.sam.parameters())
    assert model.signature() == {"architecture": a.to_dict(), "checkpoint_sha256": sha256_of(path)}


def test_tiny_sam_is_deterministic():
    a, b, c = make_tiny_sam(seed=3), make_tiny_sam(seed=3), make_tiny_sam(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["image_encoder.pos_embed"], sc["image_encoder.pos_embed"])
    assert sa["image_encoder.blocks.0.attn.rel_pos_h"].abs().sum() > 0  # not zero-initialised


def test_embeddings_equal_hand_built_sam(tiny_ckpt, tiny_sd):
    """load_model(checkpoint=...) == Sam built by hand from segment_anything.modeling."""
    model = load_model(checkpoint=tiny_ckpt, device="cpu")
    ref = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=1024, mlp_ratio=4,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    ref.load_state_dict(tiny_sd)
    emb = encode(model.sam)
    assert emb.shape == (1, 256, 64, 64)
    assert torch.equal(emb, encode(ref))
    # and the prompt path: same masks from the same embedding
    pts = (torch.tensor([[[300.0, 400.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        outs = [
            s.mask_decoder(
                image_embeddings=emb, image_pe=s.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=s.prompt_encoder(points=pts, boxes=None, masks=None)[0],
                dense_prompt_embeddings=s.prompt_encoder(points=pts, boxes=None, masks=None)[1],
                multimask_output=True,
            )[0]
            for s in (model.sam, ref)
        ]
    assert torch.equal(*outs)


@pytest.mark.slow
def test_official_vit_b_embeddings_equal_segment_anything():
    """A real-size vit_b (random weights) from segment_anything's registry and ours agree."""
    theirs = sam_model_registry["vit_b"]()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # SAM zero-initialises these; make them count
        for name, param in theirs.named_parameters():
            if name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    state = theirs.state_dict()
    arch = infer_architecture(state)
    assert arch == OFFICIAL_ARCHITECTURES["vit_b"] and arch.name == "vit_b"
    ours = build_sam(arch)
    ours.load_state_dict(state)
    model = load_model(theirs, device="cpu")
    assert model.architecture.name == "vit_b" and model.name == "custom"
    # keep the cost of a CPU run down: compare through blocks 0-2 (windowed, windowed,
    # global) and the neck rather than all 12 blocks
    for sam in (ours, model.sam):
        sam.image_encoder.blocks = sam.image_encoder.blocks[:3]
    assert torch.equal(encode(ours), encode(model.sam))


# ----------------------------------------------------------------- unwrapping


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model_state": _prefixed(sd, "sam."), "optimizer_state": {"lr": torch.tensor(1.0)}},
        lambda sd: {"state_dict": _prefixed(sd, "module.")},
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: _prefixed(sd, "module."),
        lambda sd: {"model_state": _prefixed(sd, "module.sam."), "decoder_state": {"w": torch.zeros(2)}},
        lambda sd: {"model_state": {**_prefixed(sd, "sam."), "decoder.base.weight": torch.zeros(3)}},
        lambda sd: _prefixed(sd, "_orig_mod."),
    ],
    ids=["model_state+sam.", "state_dict+module.", "model", "module.", "module.sam.", "joint", "compiled"],
)
def test_wrapped_checkpoints(tmp_path, tiny_sd, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(tiny_sd), path)
    model = load_model(checkpoint=path, device="cpu")
    loaded = model.sam.state_dict()
    assert loaded.keys() == tiny_sd.keys()
    assert all(torch.equal(loaded[k], tiny_sd[k]) for k in tiny_sd)


def test_name_contradicting_checkpoint(tiny_ckpt):
    with pytest.raises(CheckpointError) as info:
        load_model("vit_h", checkpoint=tiny_ckpt, device="cpu")
    msg = str(info.value)
    assert "tiny.pth" in msg and "'vit_h'" in msg
    assert "embed dim 32, depth 2" in msg and "(custom)" in msg and "embed dim 1280, depth 32" in msg


@pytest.mark.parametrize(
    "payload, found",
    [
        (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), "0.weight"),
        ({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}, "trunk"),  # SAM 2
        ({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3)}, "seq"),  # MobileSAM
        ([torch.zeros(3)], "list"),
    ],
    ids=["resnet-like", "sam2", "mobilesam", "list"],
)
def test_non_sam_checkpoint(tmp_path, payload, found):
    path = tmp_path / "other.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint=path, device="cpu")
    msg = str(info.value)
    assert "not a SAM checkpoint" in msg and found in msg
    assert "image_encoder.patch_embed.proj.weight" in msg and "other.pth" in msg


def test_truncated_state_dict_is_refused(tmp_path, tiny_sd):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in tiny_sd.items() if not k.startswith("mask_decoder.")}, path)
    with pytest.raises(CheckpointError, match="does not fit a SAM.*missing keys: mask_decoder"):
        load_model(checkpoint=path, device="cpu")


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth.*(was refused|could not be read)"):
        load_model(checkpoint=path, device="cpu")


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, tiny_sd, writer):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {**tiny_sd, "payload": _Evil(str(target))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint=path, device="cpu")
    assert not target.exists()
    msg = str(info.value)
    assert "evil.pth" in msg and "carries code" in msg and "weights_only=True" in msg
    # the same file *would* run code with a plain pickle load (the test is meaningful)
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if writer == "torch.save" else pickle.load(f)
    assert target.exists()


# ----------------------------------------------------------------- in-memory models


def test_load_in_memory_sam_and_sammodel():
    sam = make_tiny_sam(embed_dim=48, num_heads=3, depth=3, global_attn_indexes=(1, 2)).train()
    model = load_model(sam, device="cpu")
    assert model.sam is sam and model.name == "custom" and model.checkpoint_path is None
    assert model.architecture.encoder_global_attn_indexes == (1, 2)
    assert not sam.training and not any(p.requires_grad for p in sam.parameters())
    again = load_model(make_tiny_sam(embed_dim=48, num_heads=3, depth=3, global_attn_indexes=(1, 2)))
    assert again.checkpoint_sha256 == model.checkpoint_sha256 and len(model.checkpoint_sha256) == 64
    assert load_model(make_tiny_sam(seed=5)).checkpoint_sha256 != load_model(make_tiny_sam()).checkpoint_sha256
    assert load_model(model) is model
    assert load_model(model, device="cpu") is model and model.device == CPU
    with pytest.raises(InvalidInputError):
        load_model(model, checkpoint="x.pth")
    with pytest.raises(InvalidInputError, match="got int"):
        load_model(3)


# ----------------------------------------------------------------- names, env, devices


def test_registry_contents():
    names = list_models()
    assert names[:3] == ["vit_b", "vit_l", "vit_h"]
    assert {"vit_b_lm", "vit_l_lm", "vit_b_em_organelles", "vit_l_em_organelles"} <= set(names)
    assert REGISTRY["vit_b"].url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert REGISTRY["vit_b"].sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    filenames = set()
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.architecture in ("vit_b", "vit_l", "vit_h")
        algorithm, digest = spec.checksum
        assert len(digest) == {"sha256": 64, "xxh128": 32}[algorithm]
        int(digest, 16)
        filenames.add(spec.filename)
    assert len(filenames) == len(REGISTRY)


def test_unknown_name_lists_known_names():
    with pytest.raises(InvalidInputError) as info:
        load_model("vit_q", device="cpu")
    msg = str(info.value)
    assert "'vit_q'" in msg and "vit_b, vit_l, vit_h" in msg and "path" in msg
    with pytest.raises(InvalidInputError, match="vit_b_lm"):
        resolve_checkpoint("nope")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model(checkpoint=tmp_path / "missing.pth")
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model(str(tmp_path / "missing.pth"))


def test_default_model_name(monkeypatch):
    assert default_model_name() == "vit_b"
    monkeypatch.setenv("NAPARI_SAM_MODEL", "vit_l_lm")
    assert default_model_name() == "vit_l_lm"


def test_env_model_registry_name_and_path(monkeypatch, tmp_path, tiny_spec, tiny_ckpt):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / tiny_spec.filename).write_bytes(tiny_ckpt.read_bytes())
    monkeypatch.setenv("NAPARI_SAM_CHECKPOINTS", str(folder))
    monkeypatch.setenv("NAPARI_SAM_MODEL", "tiny")
    model = load_model(device="cpu")
    assert model.name == "tiny" and model.checkpoint_path == folder / tiny_spec.filename
    assert model.checkpoint_sha256 == tiny_spec.sha256
    other = make_tiny_checkpoint(tmp_path / "other.pth", embed_dim=48, num_heads=3)
    monkeypatch.setenv("NAPARI_SAM_MODEL", str(other))
    model = load_model(device="cpu")
    assert model.name == "other.pth" and model.architecture.encoder_embed_dim == 48


def test_explicit_checkpoint_with_registry_name(tiny_spec, tiny_ckpt, tmp_path):
    """A registry name plus a file: the file is used; its name stays unless it is the same file."""
    model = load_model("tiny", checkpoint=tiny_ckpt, device="cpu")
    assert model.name == "tiny" and model.checkpoint_path == tiny_ckpt
    finetuned = make_tiny_checkpoint(tmp_path / "finetuned.pth", seed=7)
    model = load_model("tiny", checkpoint=finetuned, device="cpu")
    assert model.name == "finetuned.pth"


def test_cache_dir(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NAPARI_SAM_CACHE_DIR")
    import platformdirs

    assert cache_dir() == Path(platformdirs.user_cache_dir("napari-sam")) / "checkpoints"


def test_choose_device():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu"
    )
    assert choose_device().type == expected
    assert choose_device("cpu") == CPU
    assert choose_device(torch.device("cpu")) == CPU
    with pytest.raises(InvalidInputError, match="banana"):
        choose_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            choose_device("cuda")


# ----------------------------------------------------------------- verification, download


def test_checkpoints_folder_lookup_and_tampered_file(monkeypatch, tmp_path, tiny_spec, tiny_ckpt):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    target = folder / tiny_spec.filename
    target.write_bytes(tiny_ckpt.read_bytes())
    monkeypatch.setenv("NAPARI_SAM_CHECKPOINTS", str(folder))
    assert resolve_checkpoint("tiny") == target
    # tamper: same size, one byte flipped in the middle
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_model("tiny", device="cpu")
    msg = str(info.value)
    assert str(target) in msg and tiny_spec.sha256 in msg and hashlib.sha256(data).hexdigest() in msg
    assert "delete it" in msg


def test_cache_folder_lookup_and_hash_cache(monkeypatch, tiny_spec, tiny_ckpt):
    dest = cache_dir() / tiny_spec.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(tiny_ckpt.read_bytes())
    calls = []
    real = _download._hash_file
    monkeypatch.setattr(_download, "_hash_file", lambda p, a: calls.append(p) or real(p, a))
    assert resolve_checkpoint("tiny") == dest
    assert resolve_checkpoint("tiny") == dest
    model = load_model("tiny", device="cpu")
    assert len(calls) == 1 and model.checkpoint_sha256 == tiny_spec.sha256
    index = json.loads((cache_dir() / "hashes.json").read_text())
    assert index[str(dest.resolve())]["digests"]["sha256"] == tiny_spec.sha256
    dest.write_bytes(dest.read_bytes() + b"x")  # size changes: hashed again, and refused
    with pytest.raises(ChecksumError):
        resolve_checkpoint("tiny")
    assert len(calls) == 2


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 from a thread; yields (base url, folder)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()


def test_download_from_local_http_server(monkeypatch, http_server, tiny_spec, tiny_ckpt):
    base, www = http_server
    (www / "tiny.pth").write_bytes(tiny_ckpt.read_bytes())
    monkeypatch.setitem(REGISTRY, "tiny", ModelSpec(**{**tiny_spec.__dict__, "url": f"{base}/tiny.pth"}))
    model = load_model("tiny", device="cpu", progress=False)
    dest = cache_dir() / tiny_spec.filename
    assert model.checkpoint_path == dest and sha256_of(dest) == tiny_spec.sha256
    assert model.name == "tiny" and model.checkpoint_sha256 == tiny_spec.sha256
    assert sorted(p.name for p in cache_dir().iterdir()) == sorted([dest.name, "hashes.json"])
    (www / "tiny.pth").unlink()  # second time: from the cache, no server needed
    assert load_model("tiny", device="cpu").checkpoint_path == dest


def test_download_from_file_url(monkeypatch, tiny_spec, tiny_ckpt):
    monkeypatch.setitem(REGISTRY, "tiny", ModelSpec(**{**tiny_spec.__dict__, "url": tiny_ckpt.as_uri()}))
    path = resolve_checkpoint("tiny", progress=True)
    assert path == cache_dir() / tiny_spec.filename and sha256_of(path) == tiny_spec.sha256


def test_download_tampered_is_discarded(monkeypatch, http_server, tiny_spec, tiny_ckpt):
    base, www = http_server
    (www / "tiny.pth").write_bytes(tiny_ckpt.read_bytes() + b"tampered")
    url = f"{base}/tiny.pth"
    monkeypatch.setitem(REGISTRY, "tiny", ModelSpec(**{**tiny_spec.__dict__, "url": url}))
    with pytest.raises(ChecksumError) as info:
        resolve_checkpoint("tiny", progress=False)
    assert url in str(info.value) and tiny_spec.sha256 in str(info.value)
    assert not cache_dir().exists() or not any(p.name.startswith("tiny_ckpt") for p in cache_dir().iterdir())


def test_download_http_404(monkeypatch, http_server, tiny_spec):
    base, _ = http_server
    url = f"{base}/missing.pth"
    monkeypatch.setitem(REGISTRY, "tiny", ModelSpec(**{**tiny_spec.__dict__, "url": url}))
    with pytest.raises(DownloadError, match="404|Not Found"):
        resolve_checkpoint("tiny", progress=False)


def test_offline_error_names_url_and_path(monkeypatch, tiny_spec):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/tiny.pth"
    monkeypatch.setitem(REGISTRY, "tiny", ModelSpec(**{**tiny_spec.__dict__, "url": url}))
    with pytest.raises(DownloadError) as info:
        load_model("tiny", device="cpu", progress=False)
    msg = str(info.value)
    assert url in msg and str(cache_dir() / tiny_spec.filename) in msg and "NAPARI_SAM_CHECKPOINTS" in msg
    assert isinstance(info.value, OSError)
    assert not any(cache_dir().glob("*.part"))


def test_xxh128_verification(monkeypatch, tmp_path, tiny_spec, tiny_ckpt):
    xxhash = pytest.importorskip("xxhash")
    digest = xxhash.xxh128(tiny_ckpt.read_bytes()).hexdigest()
    spec = ModelSpec(**{**tiny_spec.__dict__, "sha256": "", "xxh128": digest, "url": tiny_ckpt.as_uri()})
    monkeypatch.setitem(REGISTRY, "tiny", spec)
    model = load_model("tiny", device="cpu", progress=False)  # download verified by xxh128
    assert model.checkpoint_sha256 == tiny_spec.sha256  # signature is still SHA-256
    bad = ModelSpec(**{**spec.__dict__, "xxh128": "0" * 32})
    monkeypatch.setitem(REGISTRY, "tiny", bad)
    with pytest.raises(ChecksumError, match="xxh128"):
        resolve_checkpoint("tiny")


def test_xxh128_without_xxhash_is_a_clear_error(monkeypatch, tiny_spec, tiny_ckpt):
    spec = ModelSpec(**{**tiny_spec.__dict__, "sha256": "", "xxh128": "0" * 32, "url": tiny_ckpt.as_uri()})
    monkeypatch.setitem(REGISTRY, "tiny", spec)
    monkeypatch.setitem(sys.modules, "xxhash", None)  # import xxhash -> ImportError
    with pytest.raises(ChecksumError, match="pip install xxhash"):
        resolve_checkpoint("tiny")
    assert not (cache_dir() / spec.filename).exists()
