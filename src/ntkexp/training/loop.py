"""The training loop: chunks of scanned steps, divergence checks, callbacks, recording."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntkexp.empirical import empirical_ntk
from ntkexp.theory import max_weight_distance, pattern_flip_fraction, supports_patterns
from ntkexp.training.layouts import States, run_states
from ntkexp.training.result import DivergenceError, TrainResult
from ntkexp.training.step import _combine, _Config, _final_loss


@functools.partial(jax.jit, static_argnames=("cfg", "with_probe"))
def _record(cfg: _Config, with_probe: bool, p_tr, frozen, params0, x, probe_x):
    part = cfg.partition

    def one(p, fr, p0):
        full = part.combine(p, fr)
        out = {}
        if with_probe:
            out["probe_outputs"] = cfg.apply_fn(full, probe_x)
            if part.mask is None:
                out["probe_ntk"] = empirical_ntk(cfg.apply_fn, full, probe_x)
            else:
                f_tr = lambda q, xx: cfg.apply_fn(part.combine(q, fr), xx)  # noqa: E731
                out["probe_ntk"] = empirical_ntk(f_tr, p, probe_x)
        sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(full),
                                                      jax.tree_util.tree_leaves(p0), strict=True))
        out["distance"] = jnp.sqrt(sq)
        if supports_patterns(cfg.apply_fn):
            out["flip_fraction"] = pattern_flip_fraction(cfg.apply_fn, full, p0, x)
            out["max_weight_distance"] = max_weight_distance(cfg.apply_fn, full, p0)
        return out

    if cfg.ensemble:
        return jax.vmap(one)(p_tr, frozen, params0)
    return one(p_tr, frozen, params0)


def check_finite(chunk: np.ndarray, first_step: int, ensemble: bool) -> None:
    """Raise :class:`DivergenceError` naming the first non-finite loss (step, member)."""
    if np.all(np.isfinite(chunk)):
        return
    bad = ~np.isfinite(chunk)
    if ensemble:
        steps_bad = np.nonzero(bad.any(axis=0))[0]
        s = int(steps_bad[0])
        member = int(np.nonzero(bad[:, s])[0][0])
        v = chunk[member, s]
        where = f" (ensemble member {member})"
    else:
        s = int(np.nonzero(bad)[0][0])
        v, where = chunk[s], ""
    raise DivergenceError(
        f"training diverged at step {first_step + s}: loss = {v}{where}; "
        "lower the learning rate (for ngd, or add damping)"
    )


class Recorder:
    """Diagnostics at the record steps (probe outputs and NTK, distance, pattern flips)."""

    def __init__(self, cfg: _Config, params0, x, probe_x):
        self.cfg, self.params0, self.x = cfg, params0, x
        self.with_probe = probe_x is not None
        self.probe_x = probe_x if self.with_probe else x[:1]
        self.records: dict[str, list] = {}

    def __call__(self, p_tr, frozen):
        r = _record(self.cfg, self.with_probe, p_tr, frozen, self.params0, self.x, self.probe_x)
        for k, v in r.items():
            self.records.setdefault(k, []).append(v)

    def stacked(self, name: str):
        if name not in self.records:
            return None
        return jnp.stack(self.records[name], axis=1 if self.cfg.ensemble else 0)


def run_loop(cfg: _Config, st: States, *, run_chunk, threads: int, bounds, rec, x,
             recorder: Recorder, callback: Callable | None):
    """Run the chunks between ``bounds`` (recording at ``rec``, checking every loss,
    calling ``callback(step, losses so far)``): ``(p_tr, opt_state, loss chunks)``."""
    loss_chunks: list[np.ndarray] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if a in rec:
            recorder(st.gather([s[0] for s in st.states]), st.gather([s[2] for s in st.states]))
        st, outs = run_states(st, run_chunk, threads, a, b, x)
        if st.loop:
            ls = np.stack(outs, axis=0)
        elif cfg.ensemble:
            ls = np.concatenate(outs, axis=0)
        else:
            ls = outs[0]
        check_finite(ls, a, cfg.ensemble)
        loss_chunks.append(ls)
        if callback is not None:
            callback(b, np.concatenate(loss_chunks, axis=-1))
    p_tr, opt_state = st.gather([s[:2] for s in st.states])
    return p_tr, opt_state, loss_chunks


def finish(cfg: _Config, p_tr, opt_state, frozen, loss_chunks, *, steps: int, rec, x, y,
           recorder: Recorder) -> TrainResult:
    """The final loss (checked), the last record and the :class:`TrainResult`."""
    last = np.asarray(_final_loss(cfg, p_tr, frozen, x, y))
    check_finite(last[..., None], steps, cfg.ensemble)
    loss_chunks.append(last[..., None])
    if steps in rec:
        recorder(p_tr, frozen)
    return TrainResult(
        params=_combine(cfg, p_tr, frozen),
        losses=jnp.asarray(np.concatenate(loss_chunks, axis=-1)),
        record_steps=tuple(rec),
        probe_outputs=recorder.stacked("probe_outputs"),
        probe_ntk=recorder.stacked("probe_ntk"),
        distance=recorder.stacked("distance"),
        flip_fraction=recorder.stacked("flip_fraction"),
        max_weight_distance=recorder.stacked("max_weight_distance"),
        opt_state=opt_state,
    )

