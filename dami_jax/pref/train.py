"""DAMI-Pref step 4 (DESIGN 1.3): Bradley–Terry training of the reward model on a mesh.

    result = train_reward_model(cfg, data, "runs/pref/ckpt", mesh=make_mesh(data=-1))

The train step is one `jax.jit` of (params, opt_state, stats, batch): the batch
is sharded on the mesh's data axes, the (small) reward model replicated. Each
step's batch is a pure function of (seed, step): epoch e = step // steps_per_epoch
draws a permutation from (seed, e), so the data iterator's position is the step.
Every process takes its rows of that global batch and the global array is built
with `jax.make_array_from_process_local_data`, so 1 device, 8 devices and several
processes follow one loss curve.

Orbax `CheckpointManager` (every `checkpoint_every` steps and at the end) holds
params, optimizer state, stats and a JSON record of (step, epoch, offset, settings).
A rerun on the same directory restores the latest step and continues the same
trajectory; a checkpoint made with other settings is refused.

Logged to `metrics_path` (JSONL, process 0) and a tqdm bar: train loss and pair
accuracy every `log_every` steps; held-out loss, pair accuracy and the histogram
of argmax-λ over the held-out queries every `eval_every` steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dami_jax.config import ConfigError
from dami_jax.models.sharding import batch_sharding, make_mesh
from dami_jax.pref.config import TRAIN_FIELDS, PrefConfig
from dami_jax.pref.preferences import Preferences
from dami_jax.pref.reward_model import RewardModel, Stat, bt_loss


@dataclasses.dataclass
class PrefData:
    feats: np.ndarray  # (Q, D) float32 h(q) of every query
    train: Preferences
    heldout: Preferences
    heldout_queries: np.ndarray  # (H,) query ids whose pairs are held out


@dataclasses.dataclass
class TrainResult:
    model: RewardModel
    losses: dict[int, float]  # step -> train loss of that step (the steps this run executed)
    metrics: dict  # the last held-out evaluation
    step: int


def data_digest(data: PrefData) -> str:
    """sha256 (12 hex) of the features and pairs: a checkpoint resumes only on the same data."""
    h = hashlib.sha256()
    for a in (data.feats, data.train.query, data.train.win, data.train.lose, data.heldout_queries):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def batch_indices(n_pairs: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Pair indices of global batch `step`: a permutation per epoch from (seed, epoch)."""
    per_epoch = max(1, n_pairs // batch)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    if n_pairs < batch:
        perm = np.resize(perm, batch)
    return perm[offset * batch: (offset + 1) * batch]


def _data_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def _global(mesh, x: np.ndarray) -> jax.Array:
    """A batch-sharded global array; each process contributes its contiguous rows."""
    n, procs, pid = x.shape[0], jax.process_count(), jax.process_index()
    local = x[pid * n // procs: (pid + 1) * n // procs]
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), local, x.shape)


def _batch(mesh, feats, prefs: Preferences, idx, weight=None):
    h = feats[prefs.query[idx]].astype(np.float32)
    w = np.ones(len(idx), np.float32) if weight is None else weight
    return tuple(_global(mesh, a) for a in (h, prefs.win[idx], prefs.lose[idx], w))


def make_optimizer(cfg: PrefConfig) -> optax.GradientTransformation:
    warm = min(cfg.warmup_steps, cfg.steps - 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(cfg.steps, warm + 1), 0.1 * cfg.lr)
    return optax.adamw(sched, weight_decay=cfg.weight_decay)


def _steps(graphdef, tx, mesh):
    rep, data = NamedSharding(mesh, P()), batch_sharding(mesh, 1)
    hs = batch_sharding(mesh, 2)

    def loss_fn(params, stats, h, lw, ll, w):
        return bt_loss(nnx.merge(graphdef, params, stats), h, lw, ll, w)

    def train_step(params, opt_state, stats, h, lw, ll, w):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, h, lw, ll, w)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "acc": acc}

    def pick(params, stats, h, grid):
        return grid[jnp.argmax(nnx.merge(graphdef, params, stats).grid_scores(h, grid), axis=1)]

    train = jax.jit(train_step, in_shardings=(rep, rep, rep, hs, data, data, data),
                    out_shardings=(rep, rep, rep), donate_argnums=(0, 1))
    evaluate = jax.jit(loss_fn, in_shardings=(rep, rep, hs, data, data, data), out_shardings=rep)
    return train, evaluate, jax.jit(pick, in_shardings=(rep, rep, hs, rep), out_shardings=rep)


def _padded(n: int, shards: int) -> int:
    return max(shards, -(-n // shards) * shards)


def _evaluate(mesh, evaluate, pick, params, stats, data: PrefData, cfg: PrefConfig) -> dict:
    shards, held = _data_shards(mesh), data.heldout
    loss = acc = None  # no held-out pairs (every held-out query ties): nothing to measure
    if len(held):
        idx = np.resize(np.arange(len(held)), _padded(len(held), shards))
        w = (np.arange(len(idx)) < len(held)).astype(np.float32)
        loss, acc = (float(x) for x in evaluate(params, stats, *_batch(mesh, data.feats, held, idx, w)))
    q = data.heldout_queries
    qi = np.resize(q, _padded(len(q), shards))
    grid = jnp.linspace(0.0, 1.0, cfg.inference_points, dtype=jnp.float32)
    lam = np.asarray(jax.device_get(pick(params, stats, _global(mesh, data.feats[qi]), grid)))[: len(q)]
    hist = np.histogram(lam, bins=np.linspace(-0.05, 1.05, 12))[0]
    return {"heldout_loss": loss, "heldout_acc": acc, "heldout_pairs": len(held),
            "lam_hist": hist.tolist(), "lam_mean": float(lam.mean())}


def _log(path, record: dict) -> None:
    if path and jax.process_index() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _trim_log(path, step: int) -> None:
    """Forget metrics past the restored step: the resumed run logs them again."""
    if path and jax.process_index() == 0 and os.path.isfile(path):
        with open(path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(keep)


def train_reward_model(cfg: PrefConfig, data: PrefData, ckpt_dir: str | os.PathLike, *, mesh=None,
                       metrics_path: str | None = None, stop_after: int | None = None,
                       progress: bool = True) -> TrainResult:
    """Train (or resume training) to cfg.steps; `stop_after` ends early after that step's checkpoint."""
    mesh = mesh if mesh is not None else make_mesh(data=cfg.mesh_data)
    shards = _data_shards(mesh)
    if cfg.batch_size % shards or cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={cfg.batch_size} must divide evenly over {shards} data shards "
                          f"and {jax.process_count()} processes")
    if len(data.train) == 0:
        raise ValueError("no training preference pairs (every query's grid points tie?)")
    model = RewardModel(data.feats.shape[1], cfg.fourier_features, cfg.mlp_widths, rngs=nnx.Rngs(cfg.seed))
    train_q = np.setdiff1d(np.arange(len(data.feats)), data.heldout_queries)
    model.set_stats(data.feats[train_q])
    graphdef, params, stats = nnx.split(model, nnx.Param, Stat)
    tx = make_optimizer(cfg)
    rep = NamedSharding(mesh, P())
    state = jax.device_put({"params": params, "opt_state": tx.init(params), "stats": stats}, rep)
    settings = f"{cfg.fingerprint(TRAIN_FIELDS)}:{data_digest(data)}"
    opts = ocp.CheckpointManagerOptions(save_interval_steps=cfg.checkpoint_every, max_to_keep=cfg.keep_checkpoints)
    mngr = ocp.CheckpointManager(os.path.abspath(os.fspath(ckpt_dir)), options=opts)
    start = mngr.latest_step() or 0
    if start:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        if restored.meta.get("settings") != settings:
            raise ConfigError(f"{ckpt_dir}: checkpoint of step {start} was made with other settings or data "
                              f"({restored.meta.get('settings')} vs {settings}); use a new directory")
        state = restored.state
    _trim_log(metrics_path, start)  # a fresh run (start 0) starts a fresh log
    train, evaluate, pick = _steps(graphdef, tx, mesh)
    per_epoch = max(1, len(data.train) // cfg.batch_size)
    losses, metrics = {}, {}
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc="pref train", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    params, opt_state = state["params"], state["opt_state"]
    for step in bar:
        batch = _batch(mesh, data.feats, data.train, batch_indices(len(data.train), cfg.batch_size, cfg.seed, step))
        params, opt_state, out = train(params, opt_state, state["stats"], *batch)
        done = step + 1
        losses[step] = float(out["loss"])
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, "loss": losses[step], "acc": float(out["acc"])}
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['acc']:.3f}")
            _log(metrics_path, rec)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            metrics = {"step": done, **_evaluate(mesh, evaluate, pick, params, state["stats"], data, cfg)}
            _log(metrics_path, metrics)
        epoch, offset = divmod(done, per_epoch)
        meta = {"step": done, "epoch": epoch, "offset": offset, "settings": settings}
        mngr.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "stats": state["stats"]}),
            meta=ocp.args.JsonSave(meta)), force=done == end)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if not metrics:
        metrics = {"step": end, **_evaluate(mesh, evaluate, pick, params, state["stats"], data, cfg)}
    nnx.update(model, *(jax.tree.map(jnp.asarray, jax.device_get(x)) for x in (params, state["stats"])))
    return TrainResult(model, losses, metrics, max(start, end))
