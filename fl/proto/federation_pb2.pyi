from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("site_name", "version", "running_jobs", "accepts_custom_code")
    SITE_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_CUSTOM_CODE_FIELD_NUMBER: _ClassVar[int]
    site_name: str
    version: str
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    accepts_custom_code: bool
    def __init__(self, site_name: _Optional[str] = ..., version: _Optional[str] = ..., running_jobs: _Optional[_Iterable[str]] = ..., accepts_custom_code: _Optional[bool] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_s", "server_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_s: float
    server_version: str
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., server_version: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "running_jobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., running_jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "stop_jobs")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    STOP_JOBS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    stop_jobs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, known: _Optional[bool] = ..., stop_jobs: _Optional[_Iterable[str]] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("session_id", "wait_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    wait_s: float
    def __init__(self, session_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class PollReply(_message.Message):
    __slots__ = ("start_job", "task", "end_job", "unknown_session", "retry_after_s")
    START_JOB_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    END_JOB_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SESSION_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    start_job: StartJob
    task: Task
    end_job: EndJob
    unknown_session: bool
    retry_after_s: float
    def __init__(self, start_job: _Optional[_Union[StartJob, _Mapping]] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., end_job: _Optional[_Union[EndJob, _Mapping]] = ..., unknown_session: _Optional[bool] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("blob_id", "size", "checksum")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    size: int
    checksum: str
    def __init__(self, blob_id: _Optional[str] = ..., size: _Optional[int] = ..., checksum: _Optional[str] = ...) -> None: ...

class StartJob(_message.Message):
    __slots__ = ("job_id", "job_name", "app", "has_custom_code", "num_rounds", "env")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    HAS_CUSTOM_CODE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    job_name: str
    app: BlobRef
    has_custom_code: bool
    num_rounds: int
    env: _containers.ScalarMap[str, str]
    def __init__(self, job_id: _Optional[str] = ..., job_name: _Optional[str] = ..., app: _Optional[_Union[BlobRef, _Mapping]] = ..., has_custom_code: _Optional[bool] = ..., num_rounds: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("job_id", "task_id", "name", "round", "num_rounds", "meta_json", "model", "params_type", "deadline")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    name: str
    round: int
    num_rounds: int
    meta_json: str
    model: BlobRef
    params_type: str
    deadline: float
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., name: _Optional[str] = ..., round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., meta_json: _Optional[str] = ..., model: _Optional[_Union[BlobRef, _Mapping]] = ..., params_type: _Optional[str] = ..., deadline: _Optional[float] = ...) -> None: ...

class EndJob(_message.Message):
    __slots__ = ("job_id", "status", "message")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: str
    message: str
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("session_id", "blob_id", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    blob_id: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., blob_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("total_size",)
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    def __init__(self, total_size: _Optional[int] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("session_id", "upload_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    upload_id: str
    def __init__(self, session_id: _Optional[str] = ..., upload_id: _Optional[str] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("received", "complete")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received: int
    complete: bool
    def __init__(self, received: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class SubmitResultRequest(_message.Message):
    __slots__ = ("session_id", "job_id", "task_id", "upload_id", "meta_json", "metrics_json", "params_type", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_TYPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    job_id: str
    task_id: str
    upload_id: str
    meta_json: str
    metrics_json: str
    params_type: str
    error: str
    def __init__(self, session_id: _Optional[str] = ..., job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., meta_json: _Optional[str] = ..., metrics_json: _Optional[str] = ..., params_type: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitResultReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class MetricRecord(_message.Message):
    __slots__ = ("tag", "value", "step", "wall_time", "group_member", "kind", "text")
    TAG_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_MEMBER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tag: str
    value: float
    step: int
    wall_time: float
    group_member: str
    kind: str
    text: str
    def __init__(self, tag: _Optional[str] = ..., value: _Optional[float] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., group_member: _Optional[str] = ..., kind: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("time", "line", "site", "round", "job_id")
    TIME_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    time: float
    line: str
    site: str
    round: int
    job_id: str
    def __init__(self, time: _Optional[float] = ..., line: _Optional[str] = ..., site: _Optional[str] = ..., round: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("session_id", "job_id", "metrics", "logs", "job_state", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    job_id: str
    metrics: _containers.RepeatedCompositeFieldContainer[MetricRecord]
    logs: _containers.RepeatedCompositeFieldContainer[LogLine]
    job_state: str
    message: str
    def __init__(self, session_id: _Optional[str] = ..., job_id: _Optional[str] = ..., metrics: _Optional[_Iterable[_Union[MetricRecord, _Mapping]]] = ..., logs: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., job_state: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "status", "round", "num_rounds", "sites", "message", "submitted", "started", "ended", "summary_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    status: str
    round: int
    num_rounds: int
    sites: _containers.RepeatedScalarFieldContainer[str]
    message: str
    submitted: float
    started: float
    ended: float
    summary_json: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., sites: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., submitted: _Optional[float] = ..., started: _Optional[float] = ..., ended: _Optional[float] = ..., summary_json: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("job_id", "site", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    site: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., site: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class ListSitesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("name", "connected", "last_seen", "running_jobs", "registered")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOBS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    name: str
    connected: bool
    last_seen: float
    running_jobs: _containers.RepeatedScalarFieldContainer[str]
    registered: float
    def __init__(self, name: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen: _Optional[float] = ..., running_jobs: _Optional[_Iterable[str]] = ..., registered: _Optional[float] = ...) -> None: ...

class ListSitesReply(_message.Message):
    __slots__ = ("sites",)
    SITES_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    def __init__(self, sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ...) -> None: ...
