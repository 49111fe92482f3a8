"""One valid, fully populated instance of every wire message, for round trips."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from protocol import (
    ArtifactEntry,
    ChunkRequest,
    Command,
    CommandAck,
    CommandKind,
    DesiredState,
    DeviceState,
    ErrorCode,
    ErrorReply,
    FeatureReference,
    FeatureStats,
    FeatureWindow,
    Fingerprint,
    GoldenSet,
    GpuInfo,
    Hello,
    InstallStatus,
    InstallStep,
    LatencySummary,
    LogBatch,
    LogLine,
    Manifest,
    Precision,
    Preprocessing,
    Receipt,
    ReferenceProfile,
    RunningBundle,
    RuntimeRequirement,
    ShapeRange,
    SmokeExpectation,
    Target,
    TelemetryWindow,
    TensorRTBuild,
    TensorSpec,
    WireModel,
    generate_signing_key,
    sign_manifest,
)

T0 = datetime(2026, 11, 28, 9, 0, 0, tzinfo=timezone.utc)
SHA_A = "3f" * 32
SHA_B = "a1" * 32
REQ = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def manifest() -> Manifest:
    return Manifest(
        model="digits",
        version="1.0.0",
        created_at=T0,
        author="alice",
        description="8x8 digits CNN",
        task="classification",
        labels=[str(i) for i in range(10)],
        artifacts=[
            ArtifactEntry(
                name="digits-onnx-int8",
                target=Target.ONNX,
                precision=Precision.INT8,
                sha256=SHA_A,
                size=24_576,
                runtime=RuntimeRequirement(name="onnxruntime", min_version="1.18.0"),
                inputs=[TensorSpec(name="image", shape=[-1, 1, 8, 8], dtype="float32")],
                outputs=[TensorSpec(name="logits", shape=[-1, 10], dtype="float32")],
                metrics={"accuracy": 0.968, "latency_ms_p50": 0.05},
                smoke=SmokeExpectation(outputs=[[0.1] * 10], atol=0.05, min_agreement=1.0),
            ),
            ArtifactEntry(
                name="digits-tflite-int8",
                target=Target.TFLITE,
                precision=Precision.INT8,
                sha256=SHA_B,
                size=12_288,
                runtime=RuntimeRequirement(name="ai-edge-litert", min_version="1.2.0"),
                inputs=[TensorSpec(name="image", shape=[1, 1, 8, 8], dtype="int8", scale=0.0625, zero_point=-128)],
                outputs=[TensorSpec(name="logits", shape=[1, 10], dtype="int8", scale=0.1, zero_point=3)],
            ),
            ArtifactEntry(
                name="digits-tensorrt-fp16",
                target=Target.TENSORRT,
                precision=Precision.FP16,
                sha256=SHA_A,
                size=24_576,
                runtime=RuntimeRequirement(name="tensorrt", min_version="10.0", onnx_opset=20),
                inputs=[TensorSpec(name="image", shape=[-1, 1, 8, 8], dtype="float32")],
                outputs=[TensorSpec(name="logits", shape=[-1, 10], dtype="float32")],
                tensorrt=TensorRTBuild(
                    precision=Precision.FP16, workspace_bytes=256 * 1024**2,
                    profiles=[ShapeRange(input="image", min=[1, 1, 8, 8], opt=[1, 1, 8, 8], max=[32, 1, 8, 8])],
                    compute_capabilities=["8.7"], min_tensorrt="10.0",
                ),
            ),
        ],
        preprocessing=Preprocessing(kind="normalize", mean=[4.88], std=[6.02], in_graph=True),
        golden=GoldenSet(inputs=[[0.0] * 64], labels=[0]),
        reference=ReferenceProfile(
            kind="raw",
            n=1437,
            features=[
                FeatureReference(name="px0", edges=[0.0, 0.5, 1.0, 16.0], counts=[700, 300, 437], mean=2.1, std=3.0),
            ],
            class_counts=[143] * 10,
            confidence_edges=[0.0, 0.5, 0.9, 1.0],
            confidence_counts=[10, 100, 1327],
        ),
        lineage={"dataset_sha256": SHA_A, "seed": "1234", "recipe": "digits"},
    )


SIGNING_KEY = generate_signing_key()


def all_messages() -> list[WireModel]:
    signed = sign_manifest(manifest(), SIGNING_KEY)
    return [
        DeviceState(
            device_id="pi5-kitchen", status="online", session=1_795_000_000_000, seq=3, ts=T0, reason="update",
            agent_version="0.1.0",
            running=RunningBundle(model="digits", version="1.0.0", manifest_sha256=SHA_A, artifact="digits-onnx-int8",
                                  slot="a"),
            install=InstallStatus(model="digits", version="1.1.0", manifest_sha256=SHA_B, step=InstallStep.DOWNLOAD,
                                  progress=65_536, total=131_072),
        ),
        Hello(
            device_id="orin-1", session=7, agent_version="0.1.0", protocols=[1], profile="jetson-orin-nano",
            fingerprint=Fingerprint(
                arch="aarch64", os="Ubuntu 22.04", python="3.10.12", cpu_model="ARMv8 Processor rev 1 (v8l)",
                cpu_count=6, memory_bytes=8 * 1024**3, disk_free_bytes=20 * 1024**3,
                board="NVIDIA Jetson Orin Nano Developer Kit", runtimes={"onnxruntime": "1.18.0", "tensorrt": "10.3.0"},
                gpu=GpuInfo(name="Orin", compute_capability="8.7", memory_bytes=8 * 1024**3, cuda="12.6",
                            tensorrt="10.3.0"),
            ),
        ),
        DesiredState(device_id="pi5-kitchen", generation=12, issued_at=T0, bundle=signed, artifact="digits-tflite-int8",
                     rollout_id="digits-1.0.0-canary"),
        DesiredState(device_id="pi5-kitchen", generation=13, issued_at=T0),
        ChunkRequest(request_id=REQ, sha256=SHA_A, offset=65_536, length=262_144, chunk_size=65_536),
        ErrorReply(request_id=REQ, code=ErrorCode.NOT_FOUND, message="no artifact with that sha256"),
        ErrorReply(code=ErrorCode.RATE_LIMITED, message="slow down", retry_after_s=2.5),
        TelemetryWindow(
            device_id="pi5-kitchen", session=1_795_000_000_000, window_seq=42, start=T0,
            end=T0 + timedelta(seconds=60), manifest_sha256=SHA_A, requests=600, errors=2,
            latency_ms=LatencySummary(p50=1.2, p95=3.4, p99=5.0, max=9.1, mean=1.5),
            latency_edges_ms=[0.0, 1.0, 5.0, 25.0], latency_counts=[200, 396, 4],
            cpu_percent=37.5, memory_bytes=200 * 1024**2, disk_free_bytes=10 * 1024**3, temperature_c=61.2,
        ),
        FeatureStats(
            device_id="pi5-kitchen", session=1_795_000_000_000, window_seq=42, start=T0,
            end=T0 + timedelta(seconds=60), manifest_sha256=SHA_A, n=600,
            features=[FeatureWindow(name="px0", counts=[300, 150, 140], below=0, above=7, nan=3, mean=2.0, m2=5400.0,
                                    min=0.0, max=17.0)],
            class_counts=[60] * 10, confidence_counts=[5, 40, 555],
        ),
        Command(command_id=REQ, kind=CommandKind.SET_LOG_LEVEL, args={"level": "DEBUG"}, issued_at=T0,
                expires_at=T0 + timedelta(minutes=5)),
        CommandAck(device_id="pi5-kitchen", command_id=REQ, status="done", message="log level is DEBUG", ts=T0),
        Receipt(device_id="pi5-kitchen", telemetry=[(1_795_000_000_000, 41), (1_795_000_000_000, 42)],
                stats=[(1_795_000_000_000, 42)]),
        LogBatch(device_id="pi5-kitchen", command_id=REQ, next_seq=1_795_000_000_000_001,
                 lines=[LogLine(seq=1_795_000_000_000_001, ts=T0, level="INFO", logger="agent.installer",
                                text="now running digits 1.2.0 from slot b")]),
    ]
