"""The Client API's implementation: one context per training script process.

The script talks to the site agent that started it over the local channel (see
:mod:`fl.channel`). ``receive`` returns the task's model loaded from the safetensors file the agent
downloaded; ``send`` writes the result to a safetensors file and waits until the agent has
delivered it to the server.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fl.channel import ChannelClosed, LineChannel, connect_channel
from fl.checksum import Checksum
from fl.client.model import FLMetaKey, FLModel, ParamsType
from fl.client.state import SiteState

__all__ = ["ClientAPI", "NotUnderAgentError"]

TASK_TRAIN = "train"
TASK_VALIDATE = "validate"
TASK_SUBMIT_MODEL = "submit_model"


class NotUnderAgentError(RuntimeError):
    """The script was started by hand rather than by an fl site."""


def _json_safe_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not finite: {value}")
        out[str(key)] = value
    return out


class ClientAPI:
    """State of the Client API in one script process (the module-level functions delegate here)."""

    def __init__(self) -> None:
        self._channel: LineChannel | None = None
        self._info: dict[str, Any] = {}
        self._task: dict[str, Any] | None = None
        self._task_consumed = False
        self._model: FLModel | None = None  # the current task's model, once received
        self._ended = False
        self._end_status: str | None = None
        self._rank = 0
        self._state: SiteState | None = None
        self._initialized = False  # init() ran: rank 0 holds the channel, other ranks hold none

    # ------------------------------------------------------------------ lifecycle
    def init(self, rank: int | str | None = None) -> None:
        """Connect to the site agent (rank 0 only: other ranks of a torch.distributed.run script never talk to it)."""
        if self._initialized:
            return
        fd, path = os.environ.get("FL_CHANNEL_FD"), os.environ.get("FL_CHANNEL_PATH")
        if not fd and not path:
            raise NotUnderAgentError(
                "fl.client.init(): this script was not started by an fl site (no FL_CHANNEL_FD nor FL_CHANNEL_PATH). "
                "Run it through a job: `fl simulate JOB_DIR` or `job.simulator_run(...)`."
            )
        self._rank = process_rank(rank)
        if self._rank != 0:
            self._initialized = True
            self._info = {"site_name": os.environ.get("FL_SITE_NAME"), "job_id": os.environ.get("FL_JOB_ID")}
            return
        hello = {"op": "hello", "pid": os.getpid(), "rank": self._rank}
        if fd:
            self._channel = LineChannel(socket.socket(fileno=int(fd)))
            self._channel.send(hello)
        else:
            assert path is not None
            self._channel = connect_channel(path, os.environ.pop("FL_CHANNEL_TOKEN", ""), hello)
        self._initialized = True
        welcome = self._channel.recv()
        if welcome.get("op") != "welcome":
            raise RuntimeError(f"fl.client: unexpected reply from the site agent: {welcome}")
        self._info = {k: v for k, v in welcome.items() if k != "op"}
        threads = self._info.get("torch_threads")
        if threads:
            _limit_torch_threads(int(threads))

    def _require(self) -> LineChannel:
        if not self._initialized:
            self.init()
        if self._channel is None:
            raise RuntimeError(
                f"fl.client: rank {self._rank} does not talk to the site (only rank 0 does)"
                if self._rank != 0
                else "fl.client: the channel to the site agent is closed (shutdown() was called)"
            )
        return self._channel

    def get_state(self) -> SiteState:
        """This site's state for this job, kept between the script's runs (saved when a result is sent)."""
        if self._state is None:
            folder = os.environ.get("FL_STATE_DIR")
            if not folder:
                raise NotUnderAgentError(
                    "fl.client.get_state(): this script was not started by an fl site (FL_STATE_DIR is not set)"
                )
            self._state = SiteState(folder)
        return self._state

    @property
    def rank(self) -> int:
        """This process's rank (from ``init(rank=...)``, else ``RANK``/``LOCAL_RANK``); 0 talks to the site."""
        if not self._initialized:
            self.init()
        return self._rank

    def _other_rank(self) -> bool:
        """Whether this is a rank other than 0 (which gets no task: FLARE's behaviour on those ranks)."""
        return self.rank != 0

    def shutdown(self) -> None:
        if self._state is not None:
            self._state.save()
        if self._channel is not None:
            with contextlib.suppress(ChannelClosed):
                self._channel.send({"op": "bye"})
            self._channel.close()
            self._channel = None

    def detach(self) -> None:
        """Close the channel without a word, as the process's exit would (a reused script worker's run ended)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # ------------------------------------------------------------------ tasks
    def _next_task(self, timeout: float | None) -> bool:
        """Fetch the next task from the agent; False when the job has ended."""
        if self._ended:
            return False
        channel = self._require()
        channel.send({"op": "next_task", "timeout": timeout})
        reply = channel.recv()
        op = reply.get("op")
        if op == "task":
            self._task = reply["task"]
            self._task_consumed = False
            self._model = None
            return True
        if op == "end":
            self._ended = True
            self._end_status = str(reply.get("status") or "ended")
            self._task = None
            self._model = None
            return False
        if op == "timeout":
            return False
        raise RuntimeError(f"fl.client: unexpected reply from the site agent: {reply}")

    def end_status(self) -> str | None:
        """Why the loop ended: ``"run_over"`` when only this run's task is done (the site starts the script
        again for its next task, launch_once=False), else the job's own end status; None while it runs."""
        return self._end_status if self._ended else None

    def is_running(self) -> bool:
        """True while the job runs; blocks until the next task arrives or the job ends.

        On ranks other than 0: False at once (FLARE's); fl.client.distributed.is_running() gives every
        rank rank 0's answer."""
        return self.wait_for_task(None) is True

    def wait_for_task(self, timeout: float | None) -> bool | None:
        """True: a task is ready (or being worked on); False: the job has ended; None: none came within ``timeout``."""
        if self._other_rank():
            return False
        if self._task is not None and not self._task_consumed:
            return True
        if self._next_task(timeout):
            return True
        return False if self._ended else None

    def receive(self, timeout: float | None = None) -> FLModel | None:
        """The current task's model; None once the job has ended, or when no task came within ``timeout`` s."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout < math.inf
        ):
            raise ValueError(f"fl.client.receive(): timeout must be None or seconds >= 0, got {timeout!r}")
        if self._other_rank():
            return None
        if (self._task is None or self._task_consumed) and not self._next_task(timeout):
            return None
        assert self._task is not None
        self._task_consumed = True
        task = self._task
        params = None
        if task.get("model_path"):
            params = self._load(task["model_path"])
            if task.get("model_disposable"):  # read into memory: the file's tmpfs memory is freed now
                Path(task["model_path"]).unlink(missing_ok=True)
        meta = dict(task.get("meta") or {})
        meta.setdefault(FLMetaKey.CURRENT_ROUND, task["round"])
        meta.setdefault(FLMetaKey.TOTAL_ROUNDS, task["num_rounds"])
        meta.setdefault(FLMetaKey.JOB_ID, self._info.get("job_id"))
        meta.setdefault(FLMetaKey.SITE_NAME, self._info.get("site_name"))
        self._model = FLModel(
            params_type=task.get("params_type") or ParamsType.FULL,
            params=params,
            current_round=task["round"],
            total_rounds=task["num_rounds"],
            meta=meta,
        )
        return self._model

    def current_model(self, timeout: float | None = None) -> FLModel | None:
        """The model of the task not yet answered (received once, as FLARE's cached receive); else the next.

        What the Lightning callback loads before validate and fit, whether or not the script called
        ``receive()`` itself.
        """
        if self._task is not None and self._task_consumed and self._model is not None:
            return self._model
        return self.receive(timeout)

    def _load(self, path: str) -> Any:
        from fl.tensors import load_numpy, load_torch

        if self._info.get("params_format", "pytorch") == "numpy":
            return load_numpy(path)
        return load_torch(path)

    def send(self, model: FLModel, clear_cache: bool = True) -> bool:
        """Send the result of the current task; returns whether the server accepted it (False on ranks other than 0)."""
        if self._other_rank():
            return False
        if self._task is None:
            raise RuntimeError("fl.client.send(): no task received; call receive() first")
        if not isinstance(model, FLModel):
            raise TypeError(f"fl.client.send() takes an FLModel, got {type(model).__name__}")
        task = self._task
        channel = self._require()
        message: dict[str, Any] = {
            "op": "result",
            "task_id": task["task_id"],
            "meta": _json_meta(model.meta),
            "metrics": _json_safe_metrics(model.metrics),
            "params_type": getattr(model.params_type, "value", model.params_type) or ParamsType.FULL.value,
            "path": None,
        }
        params = model.params
        if params is not None and self._info.get("transfer_type") == "DIFF" and _is_full(model):
            params = self._difference(dict(params))
            message["params_type"] = ParamsType.DIFF.value
        streamed = None
        if params is not None and task.get("result_stream"):
            from fl.tensors import SerializedTensors

            # No file: the agent pulls the bytes from these tensors' memory as it uploads them.
            streamed = SerializedTensors(dict(params))
            checksum = Checksum()
            streamed.update_digest(checksum)
            message["stream"] = {"size": streamed.size}
            message["checksum"] = checksum.hexdigest()
        elif params is not None:
            from fl.tensors import write_tensors

            path = Path(task["result_path"])
            checksum = Checksum()
            write_tensors(path, dict(params), digest=checksum)
            message["path"] = str(path)
            message["checksum"] = checksum.hexdigest()
        if self._state is not None:
            self._state.save()  # before the result: a per-task run may end as soon as it is delivered
        channel.send(message)
        reply = channel.recv()
        while reply.get("op") == "pull" and streamed is not None:
            offset, size = int(reply["offset"]), int(reply["size"])
            if offset < 0 or size < 0 or offset + size > streamed.size:
                raise RuntimeError(f"fl.client: the site agent asked for bytes outside the result: {reply}")
            channel.send_bytes({"op": "data", "offset": offset, "size": size}, streamed.pieces(offset, offset + size))
            reply = channel.recv()
        if reply.get("op") != "ack":
            raise RuntimeError(f"fl.client: unexpected reply from the site agent: {reply}")
        if clear_cache:
            self._task = None
            self._model = None
        if not reply.get("accepted", False):
            warnings.warn(f"fl: the server did not accept this result: {reply.get('message')}", stacklevel=3)
            return False
        return True

    def _difference(self, params: dict[str, Any]) -> dict[str, Any]:
        """A FULL result minus the model received for this task (the job's ``params_transfer_type`` is DIFF)."""
        received = self._model.params if self._model is not None else None
        if not received:
            raise RuntimeError("fl.client.send(): params_transfer_type is DIFF but this task brought no model")
        missing = sorted(set(params) - set(received))
        if missing:
            raise ValueError(
                f"fl.client.send(): params_transfer_type is DIFF but {missing[:5]} were not in the received model"
            )
        return {name: value - received[name] for name, value in params.items()}

    # ------------------------------------------------------------------ info
    def _task_name(self) -> str | None:
        if self._other_rank():
            raise RuntimeError(f"fl.client: only rank 0 knows the task (this is rank {self._rank})")
        if self._task is None and not self._ended:
            self._next_task(None)
        return None if self._task is None else str(self._task["name"])

    def is_train(self) -> bool:
        return self._task_name() == TASK_TRAIN

    def is_evaluate(self) -> bool:
        return self._task_name() == TASK_VALIDATE

    def is_submit_model(self) -> bool:
        return self._task_name() == TASK_SUBMIT_MODEL

    def get_site_name(self) -> str:
        self._require_info()
        return str(self._info["site_name"])

    def get_job_id(self) -> str:
        self._require_info()
        return str(self._info["job_id"])

    def system_info(self) -> dict[str, Any]:
        self._require_info()
        return {"site_name": self._info["site_name"], "job_id": self._info["job_id"]}

    def get_config(self) -> dict[str, Any]:
        self._require_info()
        return dict(self._info.get("config") or {})

    def _require_info(self) -> None:
        """What any rank may ask (site name, job id) is known once init() ran."""
        if not self._initialized:
            self.init()

    # ------------------------------------------------------------------ metrics
    def log(self, key: str, value: Any, data_type: str = "SCALAR", global_step: int | None = None, **_: Any) -> None:
        """Send one metric, param or tag (or a dict of them for the plural data types) to the server.

        ``data_type`` is FLARE's AnalyticsDataType name: SCALAR/METRIC (``value`` under ``key``),
        SCALARS (a group ``key`` of members), METRICS (a dict of metrics), PARAMETER(S), TAG(S).
        """
        if self._other_rank():
            return
        self._require().send({"op": "metrics", "records": analytics_records(key, value, data_type, global_step)})


#: FLARE's AnalyticsDataType names (the enum's name or value) and the record kind each sends.
_TEXT_KINDS = {"PARAMETER": "param", "PARAMETERS": "param", "TAG": "tag", "TAGS": "tag"}
_NUMBER_TYPES = ("SCALAR", "SCALARS", "METRIC", "METRICS")


def analytics_records(key: str, value: Any, data_type: Any, step: int | None) -> list[dict[str, Any]]:
    """The records one ``log`` call sends: one per metric, param or tag."""
    name = str(getattr(data_type, "name", data_type)).upper().rsplit(".", 1)[-1]
    now = time.time()
    if name in _TEXT_KINDS:
        items = dict(value).items() if name.endswith("S") else [(key, value)]
        return [_text_record(str(k), v, now, _TEXT_KINDS[name]) for k, v in items]
    if name not in _NUMBER_TYPES:
        raise ValueError(
            f"fl.client.log(): data type {data_type!r} is not one of {', '.join(_NUMBER_TYPES)}, "
            f"{', '.join(_TEXT_KINDS)}"
        )
    if name == "SCALARS":
        return [_record(key, v, step, now, str(member)) for member, v in dict(value).items()]
    if name == "METRICS":
        return [_record(str(k), v, step, now, "") for k, v in dict(value).items()]
    return [_record(key, value, step, now, "")]


def _text_record(key: str, value: Any, now: float, kind: str) -> dict[str, Any]:
    return {
        "tag": key,
        "value": 0.0,
        "step": None,
        "wall_time": now,
        "group_member": "",
        "kind": kind,
        "text": str(value),
    }


def _record(tag: str, value: Any, step: int | None, now: float, member: str) -> dict[str, Any]:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        # TensorBoard can show NaN; JSON cannot carry it. Keep the point, say what it was.
        print(f"fl: metric {tag!r} is {value}; sent as null", file=sys.stderr)
        return {"tag": tag, "value": None, "step": step, "wall_time": now, "group_member": member}
    return {"tag": tag, "value": value, "step": step, "wall_time": now, "group_member": member}


def _is_full(model: FLModel) -> bool:
    """Whether ``model`` carries whole parameters (FULL, the default), not a difference."""
    return (getattr(model.params_type, "value", model.params_type) or ParamsType.FULL.value) == ParamsType.FULL.value


def _json_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"meta {key!r} is not finite: {value}")
        out[str(key)] = value
    return out


def process_rank(rank: int | str | None) -> int:
    """The rank of this process: ``rank`` if given, else ``RANK``, else ``LOCAL_RANK`` (torchrun's), else 0."""
    where = "init(rank=...)"
    if rank is None:
        where, rank = next(
            ((name, os.environ[name]) for name in ("RANK", "LOCAL_RANK") if os.environ.get(name)), ("", 0)
        )
    try:
        value = int(rank)
    except (TypeError, ValueError):
        value = -1
    if isinstance(rank, bool) or value < 0:
        raise ValueError(
            f"fl.client.init(): rank from {where or 'the default'} must be a whole number >= 0, got {rank!r}"
        )
    return value


def _limit_torch_threads(threads: int) -> None:
    """Apply the agent's thread budget to torch if the script uses it (so N sites don't thrash)."""
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
