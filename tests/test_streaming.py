"""Every stage after pre-training decodes only the images it uses, batch by batch (#12).

An on-disk ``imagefolder`` written here counts its decodes (``_load_image`` is wrapped): verify decodes
its n hold-out images, stage 1 the images its steps draw plus the statistics' hold-out images, the
pirate's stages the images their probe and attack visit. On an in-memory dataset the streamed stage 1
gives exactly what the whole-split code gave (that code is written out below as the reference).
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from dist_awenc.config import DownstreamConfig, VerifyConfig, WatermarkConfig, load_config
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.data.stream import IndexedImages, batches, take
from dist_awenc.encoders.io import build_encoder, card_for, load_encoder, save_encoder
from dist_awenc.verify.plan import make_plan
from dist_awenc.watermark.perturbation import choose_key, generate_delta, generation_loss, mark_statistics
from dist_awenc.watermark.secret import Secret, load_secret, save_secret

pytestmark = pytest.mark.usefixtures("one_thread")

S = 8
FILES = 500
SPLITS = [0.3, 0.4, 0.3]  # 150 pre-training, 200 hold-out, 150 downstream images
DATA = ["data.name=imagefolder", f"data.image_size={S}", "data.splits=[0.3,0.4,0.3]"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """500 small PNGs in two class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(FILES):
        d = root / f"class_{i % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def decoded(monkeypatch):
    """Counts every image file decoded (path -> times)."""
    import dist_awenc.data.images as images

    seen: Counter = Counter()
    real = images._load_image

    def counting(path, size):
        seen[path] += 1
        return real(path, size)

    monkeypatch.setattr(images, "_load_image", counting)
    return seen


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(0)
    kw = {"width": 8, "norm": "group"}
    enc = build_encoder("tiny", kw, [0.5] * 3, [0.5] * 3, S)
    out = tmp_path_factory.mktemp("enc") / "encoder"
    save_encoder(enc, out, card_for(enc, arch="tiny", arch_kwargs=kw, method="simclr", stage="pretrain", parent=None))
    return out.with_suffix(".safetensors")


def _paths(folder, split: str) -> list[str]:
    ds = build_dataset("imagefolder", root=folder, image_size=S)
    return [ds.samples[int(i)][0] for i in make_splits(len(ds), 0, SPLITS)[split]]


def test_indexed_images_index_like_the_tensor_they_replace():
    ds = build_dataset("digits", image_size=S)
    idx = make_splits(len(ds), 0)["holdout"]
    whole, labels = ds.get_batch(idx)
    view = IndexedImages(ds, idx)
    assert len(view) == len(whole) and view.shape == whole.shape and view.dim() == 4
    assert torch.equal(view.labels, labels)
    assert torch.equal(view[3], whole[3]) and torch.equal(view[-1], whole[-1])
    assert torch.equal(view[5:17], whole[5:17])
    pick = torch.tensor([9, 2, 2, 40])
    assert torch.equal(view[pick], whole[pick]) and torch.equal(take(view, pick)[1:], whole[pick][1:])
    assert torch.equal(torch.cat(list(batches(view, 64))), whole)
    assert torch.equal(torch.cat(list(batches(IndexedImages(ds, idx, num_workers=1), 64))), whole)  # a decode worker


def test_verify_decodes_only_the_n_images_it_tests(folder, encoder_file, decoded, tmp_path):
    from dist_awenc.verify.run import verify

    holdout = make_splits(FILES, 0, SPLITS)["holdout"]
    assert len(holdout) == 200
    plan = make_plan(dataset="imagefolder", dataset_size=FILES, image_size=S, split_seed=0, holdout_indices=holdout,
                     n={"whitebox": 8, "blackbox_score": 99, "blackbox_label": 99, "blackbox_collapse": 99},
                     alpha=1e-3, alternatives=0, alternatives_sha256=None, primary_mode="whitebox")
    g = torch.Generator().manual_seed(0)
    save_secret(Secret(key=torch.rand(3, S, S, generator=g), delta=(16 / 255) * torch.sign(torch.randn(3, S, S, generator=g)),
                       eps=16 / 255, control_seed=1, plan=plan), tmp_path / "secret")
    cfg = load_config(VerifyConfig, None, [f"run.out_dir={tmp_path}", "run.name=v", f"suspect={encoder_file}",
                                           f"secret={tmp_path / 'secret.safetensors'}", "verify.mode=whitebox",
                                           f"data.root={folder}", *DATA])
    (verdict,) = verify(cfg)
    assert verdict.n == 8 and not verdict.exploratory
    assert sorted(decoded) == sorted(_paths(folder, "holdout")[:8]) and set(decoded.values()) == {1}


def test_watermark_decodes_the_drawn_images_and_the_statistics_images(folder, encoder_file, decoded, tmp_path):
    from dist_awenc.watermark.generate import watermark

    steps, b, alternatives = 3, 8, 1
    watermark(load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={encoder_file}",
                                                  f"data.root={folder}", *DATA, f"generation.steps={steps}",
                                                  f"generation.batch_size={b}", f"plan.alternatives={alternatives}"]))
    pretrain, holdout = set(_paths(folder, "pretrain")), _paths(folder, "holdout")
    secrets = 1 + alternatives
    # each secret: its key image, then b drawn images per step (with replacement: an image may come twice)
    assert sum(n for p, n in decoded.items() if p in pretrain) == secrets * (1 + steps * b) < len(pretrain)
    # the statistics, and f0's baselines for the permutation test on the plan's first n white-box images
    n = min(256, len(holdout))
    assert {p: n_ for p, n_ in decoded.items() if p not in pretrain} == {p: 1 + (i < n) for i, p in enumerate(holdout)}
    stats = json.loads((tmp_path / "wm" / "generation.json").read_text())["holdout"]
    assert stats["images"] == len(holdout)


def _old_generate_delta(encoder, images, key, *, eps, alpha, steps, step_size, batch_size, seed):
    """Stage 1 as it was before streaming (K = 1, no transform, no rehearsal): the whole split on the device."""
    encoder.eval().requires_grad_(False)
    keys = key[None]
    k, b = 1, min(batch_size, len(images))
    with torch.no_grad():
        f_key = encoder(keys)
    deltas = torch.zeros_like(keys, requires_grad=True)
    gens = [torch.Generator().manual_seed(int(seed))]
    for _ in range(steps):
        idx = torch.stack([torch.randint(len(images), (b,), generator=g) for g in gens])
        x = images[idx]
        with torch.no_grad():
            f_clean = encoder(x.flatten(0, 1)).unflatten(0, (k, b))
        marked = (x + deltas[:, None]).clamp(0, 1)
        f_marked = encoder(marked.flatten(0, 1)).unflatten(0, (k, b))
        losses = torch.stack([generation_loss(f_marked[i], f_clean[i], f_key[i], alpha) for i in range(k)])
        (grad,) = torch.autograd.grad(losses.sum(), deltas)
        with torch.no_grad():
            deltas -= step_size * grad.sign()
            deltas.clamp_(-eps, eps)
    return deltas.detach()[0]


@torch.no_grad()
def _old_mark_statistics(encoder, images, secret):
    """The statistics as they were: one forward over the whole hold-out."""
    import torch.nn.functional as F

    f_key = encoder(secret.key[None])
    f_x, f_m, f_r = encoder(images), encoder(secret.mark(images)), encoder(secret.mark_control(images))
    cos = lambda a, b: float(F.cosine_similarity(a, b.expand_as(a), dim=1).mean())  # noqa: E731
    return {"cos_marked_own": cos(f_m, f_x), "cos_marked_key": cos(f_m, f_key),
            "cos_control_key": cos(f_r, f_key), "cos_clean_key": cos(f_x, f_key)}


def test_streamed_watermark_stage_gives_what_the_whole_split_code_gave(encoder_file, tmp_path):
    from dist_awenc.watermark.generate import watermark

    steps, b, seed = 6, 16, 3
    path = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={encoder_file}",
                                                         f"data.image_size={S}", f"generation.steps={steps}",
                                                         f"generation.batch_size={b}", "plan.alternatives=0",
                                                         f"run.seed={seed}"]))
    secret = load_secret(path)
    encoder, _ = load_encoder(encoder_file)
    ds = build_dataset("digits", image_size=S)
    splits = make_splits(len(ds), 0)
    pool, _ = ds.get_batch(splits["pretrain"])  # the whole split, as the stage used to hold it
    holdout, _ = ds.get_batch(splits["holdout"])
    key, _ = choose_key("image", pool, seed)
    assert torch.equal(secret.key, key)
    old = _old_generate_delta(encoder, pool, key, eps=16 / 255, alpha=1.0, steps=steps, step_size=1 / 255,
                              batch_size=b, seed=seed)
    assert torch.equal(secret.delta, old)
    view = IndexedImages(ds, splits["pretrain"])
    for images in (pool, view):  # the library call, on a tensor and on a view, is the same computation
        delta, _ = generate_delta(encoder, images, key, steps=steps, batch_size=b, seed=seed, progress=False)
        assert torch.equal(delta, old)
    stats = json.loads((tmp_path / "wm" / "generation.json").read_text())["holdout"]
    assert stats.pop("images") == len(holdout) < 512  # the digits hold-out passes in one batch, as before
    assert stats == _old_mark_statistics(encoder, holdout, secret)
    batched = mark_statistics(encoder, IndexedImages(ds, splits["holdout"]), secret, batch_size=50)
    assert batched == pytest.approx(stats, abs=1e-5)


def test_downstream_decodes_each_image_of_its_split_once(folder, encoder_file, decoded, tmp_path):
    from dist_awenc.evaluate.downstream import downstream

    metrics = downstream(load_config(DownstreamConfig, None, [f"run.out_dir={tmp_path}", "run.name=d",
                                                              f"encoder={encoder_file}", f"data.root={folder}", *DATA,
                                                              "probe.epochs=2"]))
    assert metrics["n_train"] + metrics["n_test"] == 150
    assert decoded == Counter({p: 1 for p in _paths(folder, "downstream")})


def test_probe_on_a_view_is_the_probe_on_the_tensor(encoder_file):
    from dist_awenc.evaluate.downstream import evaluate_encoder

    encoder, _ = load_encoder(encoder_file)
    ds = build_dataset("digits", image_size=S)
    idx = make_splits(len(ds), 0)["downstream"]
    images, labels = ds.get_batch(idx)
    m_tensor, a = evaluate_encoder(encoder, images, labels, 10, seed=0, epochs=3)
    m_view, b = evaluate_encoder(encoder, IndexedImages(ds, idx), labels, 10, seed=0, epochs=3)
    assert a == b and torch.equal(m_tensor.head.weight, m_view.head.weight)


def test_attack_stage_decodes_the_probe_passes_and_the_attack_batches(folder, encoder_file, decoded, tmp_path):
    from dist_awenc.attacks.stage import AttackConfig, PirateData, attack
    from dist_awenc.config import DataSection

    data = DataSection(name="imagefolder", root=str(folder), image_size=S, splits=SPLITS)
    pirate = PirateData.load(data, S)
    pirate.attack_data(0.3, 0)
    assert not decoded  # holding the pirate's split decodes nothing
    base = [f"run.out_dir={tmp_path}", f"encoder={encoder_file}", f"data.root={folder}", *DATA, "probe.epochs=2"]
    attack(load_config(AttackConfig, None, [*base, "run.name=pruned", "attack.name=prune_global", "attack.strength=0.5"]))
    down = _paths(folder, "downstream")
    assert decoded == Counter({p: 2 for p in down})  # the probe before and after; pruning reads no image
    decoded.clear()
    result = attack(load_config(AttackConfig, None, [*base, "run.name=tuned", "attack.name=finetune_full",
                                                     "attack.strength=0.001", "options.epochs=1", "options.batch_size=32"]))
    n_train = result["downstream"]["attacked"]["n_train"]
    assert sum(decoded.values()) == 2 * len(down) + n_train  # one epoch over the pirate's train part


def test_robustness_context_decodes_the_hold_out_prefix_only(folder, encoder_file, decoded, tmp_path):
    from dist_awenc.attacks import AttackOptions
    from dist_awenc.config import DataSection, ProbeSection, VerifySection
    from dist_awenc.stages.robustness import Context

    holdout = make_splits(FILES, 0, SPLITS)["holdout"]
    plan = make_plan(dataset="imagefolder", dataset_size=FILES, image_size=S, split_seed=0, holdout_indices=holdout,
                     n={"whitebox": 6, "blackbox_score": 9, "blackbox_label": 9, "blackbox_collapse": 9},
                     alpha=1e-3, alternatives=0, alternatives_sha256=None, primary_mode="whitebox")
    save_secret(Secret(key=torch.rand(3, S, S), delta=torch.zeros(3, S, S), eps=16 / 255, control_seed=1, plan=plan),
                tmp_path / "secret")
    data = DataSection(name="imagefolder", root=str(folder), image_size=S, splits=SPLITS)
    ctx = Context.load(str(encoder_file), str(tmp_path / "secret.safetensors"), data, AttackOptions(), ProbeSection(),
                       VerifySection())
    assert len(ctx.holdout) == 6 and sorted(decoded) == sorted(_paths(folder, "holdout")[:6])
