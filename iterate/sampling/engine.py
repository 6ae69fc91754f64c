"""The vLLM engine in a process of its own (``python -m iterate.sampling.engine --serve FD``).

The parent sends requests over a socket; the engine process only loads weights and
samples. Every request names the policy (a model folder or hub id) and a version (0: the
folder's own weights; n > 0: the n-th set of weights sent with a ``weights`` request):

- a policy of another shape (``key``) needs a new engine: the process is restarted;
- another (policy, version) of the same shape is loaded into the running engine in place
  (vLLM's ``reload_weights``) from the policy's folder, or, for a ``weights`` request, from
  the tensors it carries (the merged weights of a model under training: ``Sampler.sync``);
  cached prefixes are dropped either way.

The engine is seeded before every ``sample`` request (a per-request seed fails on CPU), so a
request's samples depend on (seed, request) alone, whichever engine serves it. The process
dies with its parent (``PR_SET_PDEATHSIG``); in it the engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no second spawn, ~20 s less start-up on CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from iterate import progress, workers
from iterate.store.shards import read_json

log = logging.getLogger(__name__)


def key(request: dict) -> dict:
    """What an engine is built for; a request with another key needs a new engine. The
    architecture is read from the policy's config.json, so any policy of the same shape can
    be loaded into a running engine; a hub id (no local folder) is its own key."""
    config = Path(request["policy"]) / "config.json"
    if config.exists():
        skip = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
        arch = {k: v for k, v in read_json(config, must_exist=True).items() if k not in skip}
    else:
        arch = {"policy": request["policy"]}
    return {"arch": arch, **request["engine"]}


CPU_MAX_SEQS = 256  # vLLM's default max_num_seqs on CPU (the LLM class)


def cpu_kv_cache_bytes(config: dict, engine: dict, total_memory: int) -> int:
    """On CPU, the KV cache an engine needs to run its most sequences at once
    (``CPU_MAX_SEQS`` of ``max_length`` tokens), a quarter more, at least 64 MiB and at most
    the ``gpu_memory_utilization`` share of ``total_memory`` that vLLM takes by default
    whatever the model (6 GB of a 24 GB machine for a 1M-parameter policy). ``config``: the
    policy's config.json."""
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    kv_heads = config.get("num_key_value_heads") or heads
    per_token = 2 * config.get("num_hidden_layers", 1) * kv_heads * head_dim
    per_token *= 4 if engine["dtype"] == "float32" else 2
    want = int(1.25 * per_token * CPU_MAX_SEQS * engine["max_length"])
    return min(max(want, 64 << 20), int(engine["gpu_memory_utilization"] * total_memory))


def start_llm(policy: str, engine: dict, seed: int):
    from vllm import LLM
    from vllm.platforms import current_platform

    kv = {}
    config = Path(policy) / "config.json"
    if current_platform.is_cpu() and config.exists():  # sized to the model, not to the machine
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        kv["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(read_json(config), engine, total)
    return LLM(
        **kv,
        model=policy,
        dtype=engine["dtype"],
        seed=seed,
        max_model_len=engine["max_length"],
        gpu_memory_utilization=engine["gpu_memory_utilization"],
        enforce_eager=engine["enforce_eager"],
        tensor_parallel_size=engine.get("tensor_parallel_size", 1),
        enable_sleep_mode=engine.get("sleep_level", 0) > 0,  # CUDA only
    )


def load_weights(llm, request: dict) -> None:
    """Replace the engine's weights in place: from the request's safetensors file (every
    weight of the model, mapped, not read through the socket) or from the policy's folder."""
    if request.get("weights_file"):
        from safetensors.torch import load_file

        kwargs = {"weights_iterator": list(load_file(request["weights_file"]).items())}
    else:
        kwargs = {"weights_path": request["policy"]}
    llm.collective_rpc("reload_weights", kwargs=kwargs)
    llm.reset_prefix_cache()


def sample(llm, request: dict) -> list[list[tuple]]:
    """(text, token ids, finish reason, the tokens' log-probs or None) of ``n`` samples per
    prompt."""
    from vllm import SamplingParams
    from vllm.utils.torch_utils import set_random_seed

    p = request["params"]
    params = SamplingParams(
        n=p["n"],
        temperature=p["temperature"],
        top_p=p["top_p"],
        max_tokens=p["max_tokens"],
        **({"min_tokens": p["max_tokens"], "ignore_eos": True} if p.get("ignore_eos") else {}),
        **({"logprobs": 0} if p.get("logprobs") else {}),  # the sampled token's, raw logits
    )
    set_random_seed(request["seed"])
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    reason = {"stop": "stop"}

    def logps(c) -> list[float] | None:  # each sampled token's log-prob, as the engine saw it
        if not p.get("logprobs") or c.logprobs is None:
            return None
        return [float(step[t].logprob) for t, step in zip(c.token_ids, c.logprobs, strict=True)]

    return [
        [
            (c.text, list(c.token_ids), reason.get(c.finish_reason, "length"), logps(c))
            for c in o.outputs
        ]
        for o in outs
    ]


class Server:
    """What the engine process does with each request. ``start`` builds the engine (vLLM's
    ``LLM``; the tests pass a stand-in to check the calls made around it)."""

    def __init__(self, start=None):
        self.start = start or start_llm
        self.llm, self.loaded = None, None
        self.asleep = 0  # the sleep level the engine is at (0: awake)

    def handle(self, request: dict) -> tuple[list | None, dict]:
        timer = progress.Timer()
        if request["op"] == "sleep":  # CUDA: give the GPU memory back until the next request
            if self.llm is not None and not self.asleep:
                with timer("sleep_s"):
                    self.llm.sleep(level=request["level"])
                self.asleep = request["level"]
            return None, timer.seconds
        if self.llm is None:
            with timer("engine_start_s"):
                self.llm = self.start(request["policy"], request["engine"], request["seed"])
            self.loaded = (request["policy"], 0)  # version 0: the folder's own weights
        if self.asleep:
            with timer("wake_s"):
                self.llm.wake_up()
            if self.asleep == 2:  # level 2 dropped the weights: load them again
                self.loaded = None
            self.asleep = 0
        if self.loaded != (request["policy"], request["version"]):
            if request["version"] and not request.get("weights_file"):
                raise RuntimeError(
                    f"synced weights (version {request['version']}) are not in the engine "
                    "(dropped by sleep level 2): sync them again"
                )
            with timer("weights_load_s"):
                load_weights(self.llm, request)
            self.loaded = (request["policy"], request["version"])
        samples = None
        if request["op"] == "sample":
            with timer("sample_s"):
                samples = sample(self.llm, request)
        return samples, {**timer.seconds, "engine_peak_rss_mb": round(progress.peak_rss_mb())}


def serve(fd: int) -> None:
    """The engine process: answer requests from the socket ``fd`` until it closes. Replies
    ``{"ok": True, "samples": [...] or None, "timings": {...}}`` or ``{"ok": False, "error"}``."""
    from multiprocessing.connection import Connection

    conn, server = Connection(fd), Server()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent closed the socket, or is gone
            return
        try:
            samples, timings = server.handle(request)
            reply = {"ok": True, "samples": samples, "timings": timings}
        except Exception as e:  # reported to the parent, which raises it with context
            log.exception("engine request failed")
            reply = {"ok": False, "timings": {}, "error": f"{type(e).__name__}: {e}"}
        try:
            conn.send(reply)
        except OSError:  # (a broken pipe) the parent stopped waiting: it says why
            return
        if not reply["ok"]:
            return


@contextmanager
def weights_file(model):
    """``model``'s weights (``merged_state_dict``) in a safetensors file for the engine to
    map, removed afterwards: in shared memory when it has room for them (often not in
    containers, whose /dev/shm is small), else the temp folder. 8x faster than through the
    socket (29M model: 0.09 vs 0.77 s). Files left by a killed process (its pid is in the
    name) are removed first."""
    import tempfile

    from safetensors.torch import save_file

    weights = merged_state_dict(model)
    size = sum(t.numel() * t.element_size() for t in weights.values())

    shm = "/dev/shm"
    folder = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 1.5 * size else None
    for old in Path(folder or tempfile.gettempdir()).glob("iterate-sync-*-*.safetensors"):
        pid = int(old.name.split("-")[2])
        if pid != os.getpid() and not workers.alive(pid):
            old.unlink(missing_ok=True)
    fd, path = tempfile.mkstemp(
        suffix=".safetensors", prefix=f"iterate-sync-{os.getpid()}-", dir=folder
    )
    os.close(fd)
    try:
        save_file(weights, path)
        yield path
    finally:
        Path(path).unlink(missing_ok=True)


def merged_state_dict(model) -> dict:
    """Every weight of ``model`` under its checkpoint name; for a peft model, each LoRA
    layer's base weight plus the adapter's delta, computed into a copy (the model under
    training is left as it is: merging in place and back would drift in low precision)."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "peft_config") else model
    merged = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                delta = sum(module.get_delta_weight(a) for a in adapters)
                merged[f"{name}.weight"] = module.base_layer.weight + delta
    out, seen = {}, set()
    for k, v in base.state_dict().items():
        if "lora_" in k or v.data_ptr() in seen:  # adapter weights; a tied copy (lm_head)
            continue
        seen.add(v.data_ptr())
        k = k.replace(".base_layer.", ".")
        out[k] = merged.get(k, v).detach().contiguous()
    return out


def _stat(pid) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time process ``pid`` and its children (a tensor-parallel engine's workers) have
    used, all their threads, from /proc; None where there is no /proc or no such process."""
    own = _stat(pid)
    if own is None:
        return None
    ticks = 0
    for stat in [own, *(_stat(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat"))]:
        if stat is not None and (stat is own or stat[1] == str(pid)):  # itself, or a child
            ticks += int(stat[11]) + int(stat[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


class EngineStalled(RuntimeError):
    """The engine process used no CPU for ``stall_s`` while a request waited on it."""


class Engine:
    """The client side: a vLLM engine process, started on the first request and restarted
    when a request needs another ``key``. A request waits as long as the engine works; an
    engine that uses no CPU at all for ``stall_s`` seconds (stopped, or hung) is killed and
    the request fails naming it, instead of waiting forever (0: wait forever)."""

    POLL_S = 5.0

    def __init__(self, env: dict | None = None, stall_s: float = 600):
        self.env = env or {}  # this worker's devices or CPU cores (``workers.engine_env``)
        self.stall_s = stall_s
        self.proc: subprocess.Popen | None = None
        self.conn = None
        self.key: dict | None = None

    def ensure(self, request: dict) -> None:
        """Have a process for ``request``'s key running: start one, or restart it for another
        key. Call it from the main thread: the process dies with the *thread* that started
        it (``PR_SET_PDEATHSIG``), and worker threads end with their stage."""
        from multiprocessing.connection import Connection

        k = key(request)
        if self.proc is not None and (k != self.key or self.proc.poll() is not None):
            self.close()
        if self.proc is not None:
            return
        ours, theirs = socket.socketpair()
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_LOGGING_LEVEL": "ERROR",
            **os.environ,
            **self.env,
        }
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iterate.sampling.engine", "--serve", str(theirs.fileno())],
                env=env,
                pass_fds=[theirs.fileno()],
                preexec_fn=workers.kill_with_parent,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn, self.key = Connection(ours.detach()), k

    def request(self, request: dict) -> tuple[list, dict]:
        """Send one request; returns (samples per prompt, timings)."""
        self.ensure(request)
        try:
            self.conn.send(request)
            self._wait()
            reply = self.conn.recv()
        except (EOFError, OSError):
            reply = {"ok": False, "error": f"engine process ended (exit status {self.proc.poll()})"}
        except BaseException:  # a Ctrl-C or SIGTERM while the engine works: its work is lost
            if self.proc is not None:  # (a stalled engine is killed and closed already)
                self.proc.kill()
                self.close()
            raise
        if not reply["ok"]:
            self.close()
            raise RuntimeError(f"vLLM engine failed: {reply['error']}")
        return reply["samples"], reply["timings"]

    def _wait(self) -> None:
        """Until the reply is there: raise ``EngineStalled`` (killing the engine) when its
        process used no CPU for ``stall_s`` seconds, and say so once at a tenth of that."""
        used, idle, warned = cpu_seconds(self.proc.pid), 0.0, False
        while not self.conn.poll(self.POLL_S):
            if self.proc.poll() is not None:
                raise EOFError  # it ended without a reply (``request`` says so)
            if not self.stall_s:
                continue  # wait forever
            now = cpu_seconds(self.proc.pid)
            idle = idle + self.POLL_S if now is not None and now == used else 0.0
            used = now
            if idle >= self.stall_s / 10 and not warned:
                warned = True
                log.warning(
                    "the vLLM engine (pid %d) has used no CPU for %.0fs (stopped? "
                    "hung?); it is killed after %.0fs of that (generate.engine_stall_s)",
                    self.proc.pid,
                    idle,
                    self.stall_s,
                )
            if idle >= self.stall_s:
                pid = self.proc.pid
                self.proc.kill()
                self.close()
                raise EngineStalled(
                    f"the vLLM engine (pid {pid}) used no CPU for {idle:.0f}s while a request "
                    f"waited on it (stopped or hung): killed; the same command resumes "
                    f"(generate.engine_stall_s={self.stall_s:g} sets how long to wait; 0: "
                    "forever)"
                )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)  # the socket closing ends its loop
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self.conn = self.key = None


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    import signal

    workers.kill_with_parent()
    # a Ctrl-C reaches the whole process group: the run says it, and ends the engine (the
    # socket closed, or the engine killed while it worked), so no traceback of vLLM's here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(int(sys.argv[2]))
