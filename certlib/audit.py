"""``certlib audit``: is a model's claimed Lipschitz constant true?

One report per model: the proven l2 Lipschitz bound of the logit map (body
bound times the proven norm of the head; with ``--method sdp`` on a dense
stack also the multi-layer LipSDP of the whole network, head included, where
lower) and the proven bound of every stage,
the empirical lower bound from gradient ascent (the best pair of inputs
found), the claim, a verdict, and the sound VRA at the requested radii.

Verdicts:

* ``claim proven``: the proven bound is <= the claim;
* ``claim refuted``: a pair (x, x') with ||f(x) - f(x')|| > claim ||x - x'||
  for the model's exact-arithmetic function, checked in exact rational
  arithmetic from the float64 evaluation and its rigorous rounding bound
  (proofs/margin_slack.md) -- exit code 4;
* ``not proven``: neither; the gap between the empirical and the proven
  constant is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from certlib.attack import lipschitz_pair
from certlib.bounds import Bound, up, up_add, up_mul
from certlib.certify import certify
from certlib.data import Dataset
from certlib.ir.compose import Analysis, _multilayer, analyze
from certlib.ir.graph import Graph
from certlib.verify import predict


@dataclass
class AuditReport:
    model: str
    method: str
    proven: float                    # proven bound of the logit map
    body: float
    head: float
    stages: list                     # [{"name", "op", "bound", "method"}]
    empirical: float                 # best ratio the attack found (float64, not rigorous)
    pair: dict                       # {"x": list, "x_prime": list, "ratio_lower": Fraction-checked}
    claim: float | None
    verdict: str
    gap: float | None                # proven / empirical
    vra: dict = field(default_factory=dict)   # eps -> (certified accuracy, clean accuracy)
    n: int = 0
    #: the semantics the sound VRA holds for (the Lipschitz verdict is about the exact function)
    semantics: str = "exact"
    #: how ``proven`` was found: "body x head", or "multi-layer LipSDP (whole network)"
    rule: str = "body x head"

    def finish(self, console, json_out=None, plot=None) -> None:
        """Print, write the JSON and PNG; raise ProofCheckError (exit 4) when refuted."""
        import json

        from certlib.errors import ProofCheckError

        print_audit(self, console)
        if json_out:
            Path(json_out).write_text(json.dumps(self.as_json(), indent=2) + "\n")
        if plot:
            write_audit_plot(self, plot)
        if self.verdict == "claim refuted":
            raise ProofCheckError(f"claim refuted: ||f(x) - f(x')|| / ||x - x'|| = {self.pair['ratio']:.6g} "
                                  f"> claim {self.claim} for the pair of inputs in the report")

    def as_json(self) -> dict:
        return {"model": self.model, "method": self.method, "proven_lipschitz": self.proven,
                "body": self.body, "head": self.head, "stages": self.stages,
                "empirical_lipschitz": self.empirical, "pair": self.pair, "claim": self.claim,
                "verdict": self.verdict, "proven_over_empirical": self.gap, "proven_rule": self.rule,
                "vra": {f"{e:.6g}": v for e, v in self.vra.items()}, "n": self.n, "semantics": self.semantics}


def head_norm(a: Analysis, method: str) -> float:
    """Proven ||W_head|| of the exact head: the verifier's bound on the stored
    rows plus their recorded relative rounding (|W - W^| <= r |W^| entrywise,
    so ||W - W^|| <= r ||W^||_F)."""
    from certlib.ir.op_bounds import _verifier
    from certlib.verifiers.operators import Dense

    W = np.asarray(a.head_weight, dtype=np.float64)
    b = _verifier("exact" if method == "sdp" else method)(Dense(W))
    if not isinstance(b, Bound):
        raise TypeError("the verifier must return a Bound")
    fro = up(float(np.linalg.norm(W.ravel())) * (1 + 1e-12))
    return up_add(b.value, up_mul(float(a.head_rounding) * 1.0001, fro))


def refutes(g: Graph, a: Analysis, x: np.ndarray, xp: np.ndarray, claim: float) -> bool:
    """True when ||f(x) - f(x')|| > claim ||x - x'|| for the exact function:
    the float64 logits are within err of the exact ones, so it suffices that
    ||f^(x) - f^(x')|| - err(x) - err(x') > claim ||x - x'||, checked exactly
    (Fractions; square roots bounded by their squares)."""
    if a.sound is False or claim < 0:
        return False
    logits, err = g.forward(np.stack([x, xp]), a.node_bounds)
    if not np.all(np.isfinite(logits)) or not np.all(np.isfinite(err)):
        return False
    d2 = sum((Fraction(float(p)) - Fraction(float(q))) ** 2 for p, q in zip(logits[0], logits[1]))
    n2 = sum((Fraction(float(p)) - Fraction(float(q))) ** 2 for p, q in zip(np.ravel(x), np.ravel(xp)))
    if n2 == 0:
        return False
    s = Fraction(math.sqrt(float(n2)))
    while s * s < n2:                       # an upper bound on ||x - x'||
        s = Fraction(math.nextafter(float(s), math.inf))
    rhs = Fraction(claim) * s + Fraction(float(err[0])) + Fraction(float(err[1]))
    return d2 > rhs * rhs


def run_audit(g: Graph, data: Dataset, claim: float | None, eps: list, method: str = "exact",
              steps: int = 50, model_name: str = "", n_attack: int = 64, semantics: str = "exact",
              accumulate: str = "float32") -> AuditReport:
    """``semantics``: the sound VRA at each eps holds for the model executed in
    that precision (proofs/float_semantics.md); the verdict on the claim is
    about the model's exact-arithmetic function."""
    from certlib.ir.semantics import get as get_semantics

    sem = get_semantics(semantics, accumulate)
    a = analyze(g, method=method)
    head = head_norm(a, method)
    proven = up_mul(float(a.body.value), head)
    rule = "body x head"
    if method == "sdp":
        # the whole logit map as one dense stack, head included (proofs/lipsdp.md): the
        # head couples with the last layer, which body x head cannot see
        whole, _ = _multilayer(g, len(g.nodes), proven)
        if whole is not None:
            proven, rule = float(whole.value), "multi-layer LipSDP (whole network)"
    stages = [lb.as_dict() for lb in a.layers]
    ratio, x, xp = lipschitz_pair(g, data.x[:n_attack], steps=steps)
    pair = {}
    verdict = "no claim given"
    if x is not None:
        pair = {"x": x.ravel().tolist(), "x_prime": xp.ravel().tolist(), "ratio": ratio,
                "distance": float(np.linalg.norm((xp - x).ravel()))}
    if claim is not None:
        if proven <= claim:
            verdict = "claim proven"
        elif x is not None and refutes(g, a, x, xp, claim):
            verdict = "claim refuted"
        else:
            verdict = "not proven"
    vra = {}
    if eps and not sem.exact:
        from certlib.verify_semantics import certify_semantics

        for e in eps:
            r = certify_semantics(g, data.x, data.y, a, float(e), sem)[0]
            vra[float(e)] = {"vra": r.vra, "clean": r.clean_accuracy}
    elif eps:
        logits, err = predict(g, data.x, a.node_bounds)
        for e in eps:
            r = certify(logits, err, data.y, a.K, a.body, float(e))
            vra[float(e)] = {"vra": r.vra, "clean": r.clean_accuracy}
    gap = proven / ratio if ratio > 0 else None
    return AuditReport(model_name, method, proven, float(a.body.value), head, stages, ratio, pair, claim,
                       verdict, gap, vra, len(data), sem.name, rule)


def audit_file(path, data: Dataset, claim, eps: list, method: str = "exact", steps: int = 50,
               input_shape=None, semantics: str = "exact", accumulate: str = "float32") -> AuditReport:
    from certlib.onnx.importer import load

    _, g = load(path, input_shape)
    return run_audit(g, data, claim, eps, method, steps=steps, model_name=str(path), semantics=semantics,
                     accumulate=accumulate)


def print_audit(rep: AuditReport, console) -> None:
    from rich.table import Table

    t = Table(title=f"audit of {Path(rep.model).name} ({rep.method})")
    for c in ("stage", "op", "proven bound", "how"):
        t.add_column(c)
    for s in rep.stages:
        t.add_row(str(s["name"]), str(s["op"]), f"{s['bound']:.6g}", str(s["method"]))
    console.print(t)
    how = (f"body {rep.body:.6g} x head {rep.head:.6g}" if rep.rule == "body x head" else
           f"{rep.rule}; body {rep.body:.6g} x head {rep.head:.6g} = {up_mul(rep.body, rep.head):.6g}")
    console.print(f"proven Lipschitz bound of the logits: {rep.proven:.6g} ({how})")
    console.print(f"empirical lower bound (attack): {rep.empirical:.6g}"
                  + (f"; proven / empirical = {rep.gap:.4g}" if rep.gap else ""))
    if rep.claim is not None:
        colour = {"claim proven": "green", "claim refuted": "bold red"}.get(rep.verdict, "yellow")
        extra = ""
        if rep.verdict == "not proven":
            extra = f" (proven {rep.proven:.6g} > claim {rep.claim:.6g} >= empirical {rep.empirical:.6g})"
        console.print(f"claim {rep.claim:.6g}: [{colour}]{rep.verdict}[/]{extra}")
        if rep.verdict == "claim refuted":
            p = rep.pair
            console.print(f"  pair: ||f(x) - f(x')|| / ||x - x'|| = {p['ratio']:.6g} > {rep.claim:.6g} at "
                          f"distance {p['distance']:.3g} (x and x' in the JSON report)")
            console.print(f"  x  = {np.array2string(np.array(p['x'][:8]), precision=4)}...")
            console.print(f"  x' = {np.array2string(np.array(p['x_prime'][:8]), precision=4)}...")
    for e, v in rep.vra.items():
        console.print(f"sound VRA at eps={e:.6g}: {100 * v['vra']:.1f}% (clean {100 * v['clean']:.1f}%, n={rep.n}; "
                      + (f"the model executed in {rep.semantics})" if rep.semantics != "exact"
                         else "exact-arithmetic semantics)"))


def write_audit_plot(rep: AuditReport, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [str(s["name"])[-18:] for s in rep.stages] + ["logits"]
    vals = [s["bound"] for s in rep.stages] + [rep.proven]
    ax1.bar(range(len(vals)), vals, color=["C0"] * (len(vals) - 1) + ["C3"], label="proven")
    ax1.axhline(rep.empirical, color="C2", ls="--", label="empirical (logits)")
    if rep.claim is not None:
        ax1.axhline(rep.claim, color="k", ls=":", label="claim")
    ax1.set_xticks(range(len(vals)), names, rotation=60, ha="right", fontsize=6)
    ax1.set_ylabel("Lipschitz bound")
    ax1.legend(fontsize=7)
    if rep.vra:
        es = sorted(rep.vra)
        ax2.plot(es, [100 * rep.vra[e]["vra"] for e in es], marker="o")
    ax2.set_xlabel("l2 radius")
    ax2.set_ylabel("certified accuracy (%)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{Path(rep.model).name}: {rep.verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
