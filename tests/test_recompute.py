"""A memory budget for the planner (tracer.recompute): recomputing in the backward what the arena
cannot hold. Gradients equal the unbudgeted ones bit for bit at every budget down to the smallest
plan (float32, float64, bf16 autocast, dropout, accumulation, data parallel's bucket order,
training and resume); the plan checker refuses a plan that reads a value before it is recomputed,
reads the forward's copy of a recomputed one, or lies past the budget; the report and the graph
say what was chosen and what it costs."""
import re

import numpy as np
import pytest

import gpt2
from gpt2 import train as train_mod
from gpt2.compile import memory_budget_bytes
from gpt2_jit import kernels
from gpt2_jit.kernels import elementwise, gemm, normalisation
from gpt2_jit.kernels.bf16 import BFLOAT16
from gpt2_jit.tracer import recompute
from gpt2_jit.tracer.graph import Node
from gpt2_jit.tracer.schedule import check_plan, gradient_final_steps, plan_buffers
from test_cli import corpus, small_options  # noqa: F401  (corpus is a fixture)

CFG = gpt2.GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=61)
SHAPE = (2, 16)


def batch(cfg=CFG, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, shape) for _ in range(2)]


def gradients(budget, cfg=CFG, dtype="float32", autocast=None, micro_steps=1):
    """(every parameter's gradient after micro_steps calls, the compiled model)."""
    model = gpt2.GPT(cfg, dtype=dtype, seed=0)
    cm = gpt2.compile(model, autocast=autocast, memory_budget=budget)
    for step in range(micro_steps):
        _, loss = cm(*batch(cfg, seed=step))
        loss.backward()
    return [p.grad.copy() for p in model.parameters().values()], cm


def smallest_budget(cfg=CFG, dtype="float32", autocast=None, shape=SHAPE):
    """The arena the ValueError of a 1-byte budget names as the smallest reachable."""
    model = gpt2.GPT(cfg, dtype=dtype, seed=0)
    with pytest.raises(ValueError, match="below the smallest plan") as error:
        gpt2.compile(model, autocast=autocast, memory_budget=1)(*batch(cfg, shape))
    return int(re.search(r"reach: [\d.]+ MiB \((\d+) bytes\)", str(error.value)).group(1))


def unbudgeted_arena(cfg=CFG, dtype="float32", autocast=None):
    return gradients(None, cfg, dtype, autocast)[1].memory.planned_bytes


def budgets(cfg=CFG, dtype="float32", autocast=None):
    """From the unbudgeted arena down to the smallest plan, in four steps."""
    top, bottom = unbudgeted_arena(cfg, dtype, autocast), smallest_budget(cfg, dtype, autocast)
    return [top, (3 * top + bottom) // 4, (top + bottom) // 2, (top + 3 * bottom) // 4, bottom]


def assert_bit_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- the gradients do not change

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_are_bit_equal_at_every_budget_down_to_the_smallest(dtype):
    reference, _ = gradients(None, dtype=dtype)
    chosen = set()
    for budget in budgets(dtype=dtype):
        grads, cm = gradients(budget, dtype=dtype)
        assert cm.memory.planned_bytes <= budget
        assert_bit_equal(reference, grads)
        chosen.add(cm.program.choice.level)
    assert {None, "CHEAP", "MID", "FULL"} <= chosen, chosen      # every level was exercised


def test_a_recompute_that_changes_the_numbers_is_caught(monkeypatch):
    """Negative control for the test above: the recomputed GELUs made with the other form."""
    reference, _ = gradients(None)
    model = gpt2.GPT(CFG, seed=0)
    cm = gpt2.compile(model, memory_budget=budgets()[2])
    real = recompute.recompute

    def wrong_form(graph, keep):
        g = real(graph, keep)
        nodes = [Node(n.op, n.inputs, n.outputs, dict(n.attrs, form="erf"), n.phase)
                 if n.phase == recompute.PHASE and n.op.name in ("gelu", "linear_gelu") else n
                 for n in g.nodes]
        return g.with_nodes(nodes)
    monkeypatch.setattr(recompute, "recompute", wrong_form)
    _, loss = cm(*batch())
    loss.backward()
    assert cm.program.choice.level is not None
    grads = [p.grad for p in model.parameters().values()]
    assert any(not np.array_equal(a, b) for a, b in zip(reference, grads))


def test_bf16_autocast_gradients_are_bit_equal_under_a_budget():
    reference, _ = gradients(None, autocast="bfloat16")
    kinds = set()
    for budget in budgets(autocast="bfloat16")[1:]:
        grads, cm = gradients(budget, autocast="bfloat16")
        assert cm.program.choice.level is not None
        assert_bit_equal(reference, grads)
        kinds |= {(n.op.name, n.outputs[0].dtype) for n in cm.graph.nodes
                  if n.phase == recompute.PHASE}
    # The recomputed values are bf16 where the forward's were (GEMM-only operands): LayerNorms
    # from the sum, GELUs from the pre-activation (CHEAP), whole linear_gelus (MID, FULL).
    assert {("layernorm", BFLOAT16), ("gelu", BFLOAT16), ("linear_gelu", BFLOAT16)} <= kinds


@pytest.mark.parametrize("change, shape", [(dict(bias=False), SHAPE), (dict(gelu="erf"), SHAPE),
                                           ({}, (1, 16))])
def test_gradients_are_bit_equal_without_biases_with_erf_and_at_batch_1(change, shape):
    cfg = gpt2.GPTConfig(**{**CFG.__dict__, **change})

    def grads(budget):
        model = gpt2.GPT(cfg, seed=0)
        cm = gpt2.compile(model, memory_budget=budget)
        _, loss = cm(*batch(cfg, shape))
        loss.backward()
        return [p.grad.copy() for p in model.parameters().values()], cm
    reference, _ = grads(None)
    recomputing, cm = grads(smallest_budget(cfg, shape=shape))
    assert cm.program.choice.level == "FULL"
    assert_bit_equal(reference, recomputing)


def test_an_unfused_graph_recomputes_within_its_blocks():
    """Without the fusion pass a block's input is the `add` the block before ends with, which
    FULL keeps: recomputing a block never reaches back into the one before it, and the smallest
    plan holds fewer bytes than the unbudgeted one, the gradients unchanged."""
    from gpt2_jit.tracer.autodiff import grad_name, joint_graph
    from gpt2_jit.tracer.fusion import accumulate_gradients
    from gpt2_jit.tracer.pipeline import Pass

    def unfused(budget):
        model = gpt2.GPT(CFG, seed=0)
        cm = gpt2.compile(model, memory_budget=budget)
        cm._passes["training"] = [Pass("autodiff", joint_graph), Pass(
            "accumulate_gradients", lambda g: accumulate_gradients(g, grad_name))]
        _, loss = cm(*batch())
        loss.backward()
        return [p.grad.copy() for p in model.parameters().values()], cm
    reference, plain = unfused(None)
    assert "residual_layernorm" not in str(plain.graph)
    with pytest.raises(ValueError) as error:
        unfused(1)
    smallest = int(re.search(r"reach: [\d.]+ MiB \((\d+) bytes\)", str(error.value)).group(1))
    grads, cm = unfused(smallest)
    assert_bit_equal(reference, grads)
    assert cm.program.choice.level == "FULL"
    assert cm.memory.planned_bytes < 0.6 * plain.memory.planned_bytes
    # Each block's recompute starts from values the forward kept, none from another block's.
    recomputing = [n for n in cm.graph.nodes if n.phase == recompute.PHASE]
    assert sum(n.op.name == "attention" for n in recomputing) == cm.program.choice.count


def test_dropout_masks_are_recomputed_identically():
    dropping = gpt2.GPTConfig(**{**CFG.__dict__, "dropout": 0.2})
    reference, _ = gradients(None, cfg=dropping)
    grads, cm = gradients(smallest_budget(dropping), cfg=dropping)
    assert {"attention", "dropout"} <= {n.op.name for n in cm.graph.nodes
                                        if n.phase == recompute.PHASE}
    assert_bit_equal(reference, grads)
    undropped, _ = gradients(None)
    assert any(not np.array_equal(a, b) for a, b in zip(undropped, grads))   # masks applied


def test_accumulated_gradients_are_bit_equal_under_a_budget():
    reference, _ = gradients(None, micro_steps=2)
    grads, _ = gradients(smallest_budget(), micro_steps=2)
    assert_bit_equal(reference, grads)


def test_gradients_still_finish_in_the_order_of_the_buckets():
    """Data parallel starts a bucket's all-reduce where its last gradient is final: under a
    budget every gradient is still finished in the order the arena lays them out."""
    for budget in (None, smallest_budget()):
        _, cm = gradients(budget)
        exe = cm.program.executable
        final = gradient_final_steps(exe.step_nodes, exe.graph.grads)
        step = {v.name: final[v.id] for v, _ in exe.graph.grads}
        order = [step[name] for name in cm.model.arena.slots]
        assert len(order) == len(cm.model.parameters())
        assert all(a <= b for a, b in zip(order, order[1:]))


# ---------------------------------------------------------------- the plan and its checks

def budgeted_program(budget):
    _, cm = gradients(budget)
    return cm.program


def test_no_budget_is_todays_plan_exactly():
    with_none, without = budgeted_program(None), gpt2.compile(gpt2.GPT(CFG, seed=0))
    _, loss = without(*batch())
    assert [s for s, _ in with_none.stages] == [s for s, _ in without.program.stages]
    assert with_none.plan.arena_bytes == without.program.plan.arena_bytes
    assert str(with_none.graph) == str(without.program.graph)
    roomy = budgeted_program(unbudgeted_arena())            # a budget it already fits
    assert roomy.choice.level is None and "recompute" not in [s for s, _ in roomy.stages]
    assert str(roomy.graph) == str(with_none.graph)
    assert roomy.plan.offset == with_none.plan.offset


def test_every_block_full_holds_only_block_inputs_and_marks_the_recompute():
    unbudgeted = budgeted_program(None)
    choice, keep = recompute.ladder(unbudgeted.graph)[-1]
    assert str(choice) == "FULL for every block"
    graph = recompute.recompute(unbudgeted.graph, keep)
    plan = plan_buffers(graph, forward_only_outputs=("logits",))
    check_plan(plan)
    # Of each block, the backward reads only the block's input: the sum its first node makes.
    held, blocks = recompute.held(graph), recompute.blocks(graph)
    assert len(blocks) == CFG.n_layer
    for block in blocks:
        assert block[0].op.name == "residual_layernorm"
        assert [o for n in block for o in n.outputs if o.id in held] == [block[0].outputs[0]]
    assert plan.held_bytes < unbudgeted.plan.held_bytes / 3
    text = str(graph)
    assert text.count("-- recompute") == CFG.n_layer
    # Before each block's backward: its LayerNorm from the kept sum, then its forward again.
    ops = [n.op.name for n in graph.nodes if n.phase == recompute.PHASE]
    assert ops == ["layernorm", "linear", "attention", "linear", "residual_layernorm",
                   "linear_gelu"] * CFG.n_layer
    assert plan.recomputed and not any(
        v.id in plan.recomputed for n in plan.order[plan.n_forward:] for v in n.inputs)


def test_the_checker_refuses_a_read_before_the_recompute():
    program = budgeted_program(smallest_budget())
    order = list(program.plan.order)
    first = next(i for i, n in enumerate(order) if n.phase == recompute.PHASE)
    reader = next(i for i in range(first + 1, len(order)) if order[i].phase == "backward")
    order.insert(first, order.pop(reader))             # the reader runs before the recompute
    moved = program.graph.with_nodes(order)
    with pytest.raises(AssertionError, match="before it is written"):
        check_plan(plan_buffers(moved, forward_only_outputs=("logits",)))


def test_the_checker_refuses_a_read_of_the_forwards_copy():
    program = budgeted_program(smallest_budget())
    nodes = list(program.graph.nodes)
    copies = {o.id for n in nodes if n.phase == recompute.PHASE for o in n.outputs}
    forward = {o.id: o for n in nodes if n.phase == "forward" for o in n.outputs}
    i, k = next((i, k) for i, n in enumerate(nodes) if n.phase == "backward"
                for k, v in enumerate(n.inputs) if v.id in copies)
    copy = nodes[i].inputs[k]
    original = next(forward[r] for r in program.plan.recomputed
                    if forward[r].shape == copy.shape and forward[r].dtype == copy.dtype)
    ins = list(nodes[i].inputs)
    ins[k] = original                     # the backward reads the forward's value after all
    nodes[i] = Node(nodes[i].op, ins, nodes[i].outputs, nodes[i].attrs, nodes[i].phase)
    with pytest.raises(AssertionError, match="recomputes it"):
        check_plan(plan_buffers(program.graph.with_nodes(nodes),
                                forward_only_outputs=("logits",)))


def test_the_checker_refuses_an_arena_over_the_budget():
    plan = budgeted_program((unbudgeted_arena() + smallest_budget()) // 2).plan
    check_plan(plan, plan.arena_bytes)
    with pytest.raises(AssertionError, match="over the budget"):
        check_plan(plan, plan.arena_bytes - 1)
    # One storage placed past the end while the arena's size still reads within the budget.
    last = max(plan.offset, key=lambda s: plan.offset[s] + plan.nbytes[s])
    plan.offset[last] = plan.arena_bytes
    with pytest.raises(AssertionError, match="over the budget"):
        check_plan(plan, plan.arena_bytes)


def test_the_named_minimum_is_the_smallest_arena_of_the_ladder():
    graph = budgeted_program(None).graph
    arenas = [plan_buffers(recompute.recompute(graph, keep), ("logits",)).arena_bytes
              for _, keep in recompute.ladder(graph)]
    assert len(arenas) == 1 + 3 * CFG.n_layer
    assert smallest_budget() == min(arenas) < arenas[-1]    # not the last rung, on this graph


def test_a_budget_below_the_smallest_plan_names_it_and_the_smallest_works():
    smallest = smallest_budget()
    with pytest.raises(ValueError, match=f"memory_budget .*{smallest - 1} bytes.* below the "
                                         f"smallest plan recomputing can reach: .*{smallest}"):
        gradients(smallest - 1)
    assert gradients(smallest)[1].memory.planned_bytes == smallest


def test_a_forward_only_plan_over_the_budget_is_refused():
    model = gpt2.GPT(CFG, seed=0)
    cm = gpt2.compile(model, memory_budget=64)
    with pytest.raises(ValueError, match="forward-only plan's arena"):
        cm(batch()[0])


def test_the_report_counts_the_recompute_flops_by_hand():
    """A FULL block recomputes: ln_1 (C + 2 values a row), c_attn, attention, c_proj, the ln_2
    residual add and LayerNorm (2C + 2), c_fc (its GELU not counted beside the GEMM); a MID
    block ln_1, c_attn, ln_2 (C + 2) and c_fc."""
    n, c, t = SHAPE[0] * SHAPE[1], CFG.n_embd, SHAPE[1]
    mid = (n * c + 2 * n) + 2 * n * c * 3 * c + (n * c + 2 * n) + 2 * n * c * 4 * c
    full = (n * c + 2 * n) + 2 * n * c * 3 * c + 2 * SHAPE[0] * t * (t + 1) * c + \
        2 * n * c * c + (2 * n * c + 2 * n) + 2 * n * c * 4 * c
    _, cm = gradients(smallest_budget())
    report, choice = cm.memory, cm.program.choice
    assert choice.level == "FULL" and choice.rest == "MID"
    assert report.recompute_flops == choice.count * full + (CFG.n_layer - choice.count) * mid
    assert 0.1 < report.recompute_fraction < 0.5
    assert report.budget_bytes == smallest_budget()
    assert f"recomputing {cm.program.choice}" in str(report)
    assert f"(+{100 * report.recompute_fraction:.1f}% on the step's FLOPs)" in str(report)
    assert gradients(None)[1].memory.budget_bytes is None


# ---------------------------------------------------------------- the recomputing forms' kernels

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,c", [(1, 1), (7, 33), (64, 768)])
def test_layernorm_of_the_sum_is_residual_layernorms_bit_for_bit(dtype, rows, c):
    rng = np.random.default_rng(rows)
    x, r = rng.standard_normal((2, rows, c)).astype(dtype)
    w, b = rng.standard_normal((2, c)).astype(dtype)
    s, y, mean, rstd = (np.empty((rows, c), dtype), np.empty((rows, c), dtype),
                        np.empty(rows, dtype), np.empty(rows, dtype))
    normalisation.residual_layernorm(s, y, mean, rstd, x, r, w, b, eps=1e-5)
    y2, mean2, rstd2 = np.empty_like(y), np.empty_like(mean), np.empty_like(rstd)
    normalisation.layernorm(y2, mean2, rstd2, s, w, b, eps=1e-5)
    for a, b_ in ((y, y2), (mean, mean2), (rstd, rstd2)):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("out_dtype", [np.float32, BFLOAT16])
@pytest.mark.parametrize("form", ["tanh", "erf"])
@pytest.mark.parametrize("rows,i,o", [(1, 3, 5), (9, 16, 67)])
def test_gelu_of_the_pre_activation_is_linear_gelus_bit_for_bit(out_dtype, form, rows, i, o):
    rng = np.random.default_rng(o)
    x = rng.standard_normal((rows, i)).astype(np.float32)
    w = rng.standard_normal((o, i)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    out, pre = np.empty((rows, o), out_dtype), np.empty((rows, o), np.float32)
    gemm.linear_gelu(out, pre, x, w, b, form=form)
    again = np.empty_like(out)
    elementwise.gelu(again, pre, form=form)
    np.testing.assert_array_equal(out.view(np.uint8), again.view(np.uint8))
    expected = np.empty((rows, o), np.float32)
    kernels.reference.gelu(expected, pre, form=form)           # and it is GELU
    np.testing.assert_allclose(again.astype(np.float32), expected,
                               rtol=1e-2 if out_dtype is BFLOAT16 else 1e-6, atol=1e-6)


# ---------------------------------------------------------------- budgets as users write them

@pytest.mark.parametrize("text,expected", [("6GiB", 6 * 2**30), ("512 MiB", 512 * 2**20),
                                           ("8GB", 8 * 10**9), ("1.5gib", 3 * 2**29),
                                           ("6e9", 6 * 10**9), ("1e+3KB", 10**6),
                                           (12345, 12345), (np.float32(2048), 2048)])
def test_budget_sizes_parse(text, expected):
    assert memory_budget_bytes(text) == expected


@pytest.mark.parametrize("bad", ["6 parsecs", "GiB", "-1GiB", "", "0.5", 0, -5, True,
                                 float("nan"), float("inf")])
def test_bad_budgets_are_named(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        gpt2.compile(gpt2.GPT(CFG, seed=0), memory_budget=bad)


def test_cli_trains_and_resumes_under_a_budget_bit_for_bit(corpus, tmp_path):  # noqa: F811
    """--memory-budget at its smallest: the same losses as without a budget, a resumed run the
    same as a straight one, and the run says what its plan recomputes."""
    constant = dict(lr=1e-2, min_lr=1e-2, warmup=0, eval_interval=3)
    probe = train_mod.TrainConfig(**small_options(corpus, tmp_path / "probe")).resolve()
    smallest = smallest_budget(probe.model_config(), shape=(probe.batch_size, probe.block_size))
    plain = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "plain", **constant)))
    budget = f"{smallest}B"
    straight = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "straight", memory_budget=budget, **constant)))
    assert straight == plain
    train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "split", steps=3, memory_budget=budget, **constant)))
    resumed = train_mod.train(train_mod.TrainConfig(**small_options(
        corpus, tmp_path / "split", resume=True, memory_budget=budget, **constant)))
    assert resumed == straight


def test_cli_names_the_plan_and_refuses_the_eager_engine(corpus, tmp_path, capsys):  # noqa: F811
    from gpt2 import cli
    argv = ["train", "--preset", "tiny", "--data-dir", str(corpus), "--n-layer", "1",
            "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
            "--steps", "1", "--sample-tokens", "0", "--eval-batches", "1"]
    assert cli.main(argv + ["--out-dir", str(tmp_path / "a"), "--memory-budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory budget 1.00 GiB" in out and "plan: arena" in out and "budget 1.00 GiB" in out
    assert cli.main(argv + ["--out-dir", str(tmp_path / "b"), "--memory-budget", "1GiB",
                            "--eager"]) != 0
    assert "--eager" in capsys.readouterr().err


def test_the_memory_refusal_suggests_a_budget_and_counts_one(monkeypatch):
    cfg = train_mod.TrainConfig(preset="gpt2-large", batch_size=4).resolve()
    monkeypatch.setattr(train_mod, "available_memory", lambda: 20 * 2**30)
    with pytest.raises(ValueError, match=r"or --memory-budget [\d.]+GiB recomputes"):
        train_mod.check_memory(cfg.model_config(), cfg)
    cfg.memory_budget = memory_budget_bytes("4GiB")
    train_mod.check_memory(cfg.model_config(), cfg)          # 12.4 GB of state + 4 GiB fits
    cfg.memory_budget = memory_budget_bytes("12GiB")
    with pytest.raises(ValueError, match=r"--memory-budget 8\.4GiB would fit"):
        train_mod.check_memory(cfg.model_config(), cfg)      # 20 GiB less 11.54 GiB, rounded down
