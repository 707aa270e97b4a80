"""Prototypes, semantic routing and grouped aggregation of expert logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from condu_merge import ContinualMerger, FormatError, MergeInputError, UnknownTaskError
from condu_merge.routing import (
    SemanticAggregator,
    class_text_embeddings,
    compute_prototypes,
    load_prototypes,
    prototypes_from_encoders,
    route,
    route_scores,
    save_prototypes,
)


def n(x):
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------------------- prototypes


def test_prototypes_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    c, t, d = 4, 3, 8
    img = torch.randn(10, d, generator=g) * 5
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 0, 1, 2, 2])  # class 3 has no images
    txt = torch.randn(c, t, d, generator=g)
    out = compute_prototypes(img, lab, txt)
    for k in range(c):
        tk = torch.stack([n(txt[k, j]) for j in range(t)]).mean(0)
        rows = [n(img[i]) for i in range(10) if lab[i] == k]
        if rows:
            ref = n((torch.stack(rows).mean(0) + tk) / 2)
        else:
            ref = n(tk)
        torch.testing.assert_close(out["prototypes"][k], ref)
    assert out["image_counts"].tolist() == [3, 4, 3, 0]
    # encoder-level helper gives the same from batches
    w = torch.randn(d, d, generator=g)
    enc_i = lambda x: x @ w  # noqa: E731
    enc_t = lambda tok: torch.nn.functional.one_hot(tok[:, 0] % d, d).float() + tok[:, 1:2].float() / 10  # noqa: E731
    prompts = torch.randint(0, 50, (c, t, 5), generator=g)
    batches = [(img[:6], lab[:6]), (img[6:], lab[6:])]
    got = prototypes_from_encoders(enc_i, enc_t, batches, prompts)
    ref = compute_prototypes(img @ w, lab, enc_t(prompts.reshape(c * t, 5)).reshape(c, t, d))
    torch.testing.assert_close(got["prototypes"], ref["prototypes"])
    with pytest.raises(ValueError, match="labels"):
        compute_prototypes(img, torch.full((10,), 7), txt)


def test_prototypes_file_round_trip(tmp_path):
    p = {
        "cars": {"prototypes": torch.randn(3, 4), "image_counts": torch.tensor([1, 0, 2])},
        "dtd": {"prototypes": torch.randn(2, 4), "image_counts": torch.tensor([5, 5])},
    }
    save_prototypes(tmp_path / "p.safetensors", p)
    back = load_prototypes(tmp_path / "p.safetensors")
    assert set(back) == set(p)
    for task in p:
        for k in p[task]:
            assert torch.equal(back[task][k], p[task][k])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FormatError, match="bad.safetensors"):
        load_prototypes(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------- routing


def synthetic_tasks(num_tasks=6, classes=3, d=24, seed=0):
    """Each task's prototypes lie near its own random direction; a sample of task t is a noisy
    copy of one of task t's prototypes."""
    g = torch.Generator().manual_seed(seed)
    centres = n(torch.randn(num_tasks, d, generator=g))
    protos = {f"task{t}": n(centres[t] + 0.3 * torch.randn(classes, d, generator=g)) for t in range(num_tasks)}
    truth = torch.arange(num_tasks).repeat_interleave(5)
    cls = torch.randint(0, classes, (truth.numel(),), generator=g)
    feats = torch.stack([protos[f"task{int(t)}"][int(c)] for t, c in zip(truth, cls)])
    feats = (feats + 0.05 * torch.randn(feats.shape, generator=g)) * 3.0  # unnormalised on purpose
    return protos, feats, truth


def test_route_picks_the_right_task():
    protos, feats, truth = synthetic_tasks()
    scores = route_scores(feats, protos)
    assert torch.equal(scores.argmax(1), truth)
    sel1 = route(feats, protos, k=1)
    assert torch.equal(sel1.float().argmax(1), truth) and sel1.sum(1).eq(1).all()
    sel3 = route(feats, protos, k=3)
    assert sel3.sum(1).eq(3).all() and sel3[torch.arange(len(truth)), truth].all()
    # the selected tasks are exactly the top-3 scores
    top = scores.topk(3, dim=1).values[:, -1:]
    assert torch.equal(sel3, scores >= top)
    assert route(feats, protos).sum(1).eq(5).all()  # K = 5 by default
    assert route(feats, protos, k=50).all()  # K larger than the number of tasks: all
    # ties go to the earlier task
    same = {"a": torch.eye(3)[:1], "b": torch.eye(3)[:1], "c": -torch.eye(3)[:1]}
    assert route(torch.tensor([[1.0, 0, 0]]), same, k=1).tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="K"):
        route(feats, protos, k=0)


class FakeExperts:
    """Expert ``t`` is a fixed linear map per task (pretrained: identity); counts the work done."""

    def __init__(self, tasks, d=24, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.w = {t: torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) for t in tasks}
        self.w[None] = torch.eye(d)
        self.emb = torch.randn(50, d, generator=g)
        self.image_rows = {}
        self.text_calls = {}

    def encode_image(self, task, x):
        self.image_rows[task] = self.image_rows.get(task, 0) + x.shape[0]
        return x @ self.w[task]

    def encode_text(self, task, tok):
        self.text_calls[task] = self.text_calls.get(task, 0) + 1
        return self.emb[tok].mean(1) @ self.w[task]


def reference_logits(experts, sel, tasks, x, prompts, include_pretrained=False):
    """Every expert on every sample, then the mask-weighted mean (the slow, obvious way)."""

    def full(t):
        text = n(torch.stack([n(experts.encode_text(t, prompts[c])).mean(0) for c in range(prompts.shape[0])]))
        return 100 * n(experts.encode_image(t, x)) @ text.t()

    total = sum(sel[:, j, None].float() * full(t) for j, t in enumerate(tasks))
    cnt = sel.sum(1, keepdim=True).float()
    if include_pretrained:
        total, cnt = total + full(None), cnt + 1
    return total / cnt


@pytest.mark.parametrize("include_pretrained", [False, True])
def test_grouped_execution_equals_all_experts(include_pretrained):
    protos, feats, truth = synthetic_tasks()
    tasks = list(protos)
    ex = FakeExperts(tasks)
    agg = SemanticAggregator(ex, protos, k=2, include_pretrained=include_pretrained)
    prompts = torch.randint(0, 50, (7, 3, 4), generator=torch.Generator().manual_seed(5))
    out = agg.logits(feats, "ds", prompts)
    sel = route(feats, protos, k=2)
    ref = reference_logits(FakeExperts(tasks), sel, tasks, feats, prompts, include_pretrained)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    # each expert ran only on its own samples; routing used one pretrained pass
    for j, t in enumerate(tasks):
        assert ex.image_rows.get(t, 0) == int(sel[:, j].sum())
    assert ex.image_rows[None] == feats.shape[0] * (2 if include_pretrained else 1)
    # text embeddings are computed once per (expert, dataset)
    agg.logits(feats, "ds", prompts)
    assert all(v == 1 for v in ex.text_calls.values())
    agg.logits(feats[:3], "other", prompts[:2])
    assert ex.text_calls[tasks[0]] == 2
    # known task id: that expert alone
    alone = agg.logits(feats, "ds", prompts, task="task2")
    torch.testing.assert_close(alone, agg.expert_logits("task2", feats, "ds", prompts))
    with pytest.raises(UnknownTaskError, match="nope"):
        agg.logits(feats, "ds", prompts, task="nope")


def test_class_text_embeddings_average_templates():
    ex = FakeExperts(["a"])
    prompts = torch.randint(0, 50, (4, 2, 3), generator=torch.Generator().manual_seed(2))
    got = class_text_embeddings(lambda t: ex.encode_text("a", t), prompts, batch_size=3)
    ref = n(
        torch.stack(
            [
                (n(ex.encode_text("a", prompts[c, :1])) + n(ex.encode_text("a", prompts[c, 1:]))).squeeze(0) / 2
                for c in range(4)
            ]
        )
    )
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------------------- real tiny CLIP


def test_aggregator_with_clip_experts():
    pytest.importorskip("open_clip")
    from test_adapters_clip import finetune, images, tiny_open_clip, tokens

    from condu_merge.adapters.clip import ClipExperts, clip_delta

    base = tiny_open_clip()
    merger = ContinualMerger()
    for i, s in enumerate((3, 22, 23)):
        merger.add_task(f"t{i}", clip_delta(base, finetune(base, "whole", seed=s)))
    model = copy.deepcopy(base)
    experts = ClipExperts(model, merger.unified, merger.triggers)
    x = images(6, seed=40)
    prompts = tokens(8, seed=41).reshape(4, 2, -1)
    with torch.no_grad():
        protos = {}
        for i, t in enumerate(merger.task_names):
            lab = torch.tensor([0, 1, 2, 3, 0, 1])
            txt = base.encode_text(prompts.reshape(8, -1)).reshape(4, 2, -1)
            protos[t] = compute_prototypes(base.encode_image(images(6, seed=50 + i)), lab, txt)
    agg = SemanticAggregator(experts, protos, k=2)
    with torch.no_grad():
        out = agg.logits(x, "ds", prompts)
        sel = agg.select(x)
        ref = reference_logits(experts, sel, merger.task_names, x, prompts)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    assert sel.sum(1).eq(2).all()


def test_store_integration(tmp_path):
    """Prototypes and experts straight from a persistent store give the same logits as in memory."""
    pytest.importorskip("open_clip")
    store_mod = pytest.importorskip("condu_merge.store")
    from test_adapters_clip import finetune, images, tiny_open_clip, tokens

    from condu_merge.adapters.clip import ClipExperts, clip_delta
    from condu_merge.routing import prototypes_from_store

    base = tiny_open_clip()
    store = store_mod.Store(tmp_path / "s")
    merger = ContinualMerger()
    prompts = tokens(6, seed=61).reshape(3, 2, -1)
    with torch.no_grad():
        txt = base.encode_text(prompts.reshape(6, -1)).reshape(3, 2, -1)
    protos = {}
    for i, s in enumerate((3, 22)):
        d = clip_delta(base, finetune(base, "whole", seed=s))
        merger.add_task(f"t{i}", d)
        store.add_task(f"t{i}", d)
        with torch.no_grad():
            protos[f"t{i}"] = compute_prototypes(
                base.encode_image(images(3, seed=70 + i)), torch.tensor([0, 1, 2]), txt
            )
        store.save_prototypes(f"t{i}", protos[f"t{i}"])
    loaded = prototypes_from_store(store_mod.Store(tmp_path / "s"))
    assert set(loaded) == {"t0", "t1"} and torch.equal(loaded["t1"]["prototypes"], protos["t1"]["prototypes"])
    x = images(4, seed=80)
    with torch.no_grad():
        a = SemanticAggregator(ClipExperts.from_store(copy.deepcopy(base), store), loaded, k=1).logits(x, "ds", prompts)
        b = SemanticAggregator(ClipExperts.from_merger(copy.deepcopy(base), merger), protos, k=1).logits(
            x, "ds", prompts
        )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- review fixes


def test_text_cache_not_reused_for_other_prompts_under_one_dataset_name():
    """Same dataset name, different class prompts (another class list or templates): the cached
    text embeddings must not be reused; equal prompts (another tensor object) reuse them."""
    protos, feats, _ = synthetic_tasks()
    tasks = list(protos)
    ex = FakeExperts(tasks)
    agg = SemanticAggregator(ex, protos, k=2)
    g = torch.Generator().manual_seed(9)
    p1 = torch.randint(0, 50, (7, 3, 4), generator=g)
    p2 = torch.randint(0, 50, (7, 3, 4), generator=g)
    agg.logits(feats, "ds", p1)
    calls = dict(ex.text_calls)
    agg.logits(feats, "ds", p1.clone())
    assert ex.text_calls == calls
    out = agg.logits(feats, "ds", p2)
    ref = reference_logits(FakeExperts(tasks), route(feats, protos, k=2), tasks, feats, p2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    short = agg.logits(feats, "ds", p2[:4], task=tasks[0])
    assert short.shape == (feats.shape[0], 4)


def test_empty_batch_gives_empty_logits():
    protos, feats, _ = synthetic_tasks()
    agg = SemanticAggregator(FakeExperts(list(protos)), protos, k=2)
    prompts = torch.randint(0, 50, (7, 3, 4), generator=torch.Generator().manual_seed(5))
    for kw in ({}, {"task": next(iter(protos))}):
        out = agg.logits(feats[:0], "ds", prompts, **kw)
        assert out.shape == (0, 7)


def test_selection_row_without_expert_is_refused():
    protos, feats, _ = synthetic_tasks()
    agg = SemanticAggregator(FakeExperts(list(protos)), protos, k=2)
    prompts = torch.randint(0, 50, (7, 3, 4), generator=torch.Generator().manual_seed(5))
    sel = route(feats, protos, k=1)
    sel[2] = False
    with pytest.raises(MergeInputError, match="sample 2"):
        agg.logits(feats, "ds", prompts, selection=sel)
    # with the pretrained model as a member, a row may select no expert
    agg2 = SemanticAggregator(FakeExperts(list(protos)), protos, k=2, include_pretrained=True)
    out = agg2.logits(feats, "ds", prompts, selection=sel)
    torch.testing.assert_close(out[2], agg2.expert_logits(None, feats[2:3], "ds", prompts)[0])
