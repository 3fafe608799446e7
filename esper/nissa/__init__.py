"""Nissa: telemetry hub, backends, profiles, on-device diagnostics, narratives, analytics."""

from esper.nissa.analytics import BlueprintAnalytics, BlueprintStats
from esper.nissa.anomaly import (
    AnomalyMonitor,
    EscalationState,
    GradientDriftDetector,
    PerformanceDegradationDetector,
    ValueCollapseDetector,
    check_lstm_health,
    check_ratio_explosion,
    lstm_hidden_stats,
)
from esper.nissa.backends import (
    BACKEND_NAMES,
    ConsoleBackend,
    JsonlBackend,
    TensorBoardBackend,
    make_backends,
)
from esper.nissa.config import (
    PROFILE_NAMES,
    ProfileError,
    TelemetryConfig,
    apply_overrides,
    available_profiles,
    load_profile,
    load_profile_file,
    profiles_dir,
)
from esper.nissa.diagnostics import (
    DiagnosticTracker,
    activation_stats,
    gradient_stats,
    loss_sharpness,
    per_class_metrics,
    weight_norms,
)
from esper.nissa.hub import Backend, NissaHub
from esper.nissa.materialize import TRANSFERS, TransferCounter, epoch_event, materialize
from esper.nissa.narratives import (
    EnvBrief,
    NarrativeRules,
    TrainingHistory,
    build_briefs,
    explain_decision,
)
from esper.nissa.profiling import PHASES, phase, trace_run
from esper.nissa.syncs import SyncCount, count_host_syncs

__all__ = [
    "BACKEND_NAMES",
    "PHASES",
    "PROFILE_NAMES",
    "TRANSFERS",
    "AnomalyMonitor",
    "Backend",
    "BlueprintAnalytics",
    "BlueprintStats",
    "ConsoleBackend",
    "DiagnosticTracker",
    "EnvBrief",
    "EscalationState",
    "GradientDriftDetector",
    "JsonlBackend",
    "NarrativeRules",
    "NissaHub",
    "PerformanceDegradationDetector",
    "ProfileError",
    "SyncCount",
    "TelemetryConfig",
    "TensorBoardBackend",
    "TrainingHistory",
    "TransferCounter",
    "ValueCollapseDetector",
    "activation_stats",
    "apply_overrides",
    "available_profiles",
    "build_briefs",
    "check_lstm_health",
    "check_ratio_explosion",
    "count_host_syncs",
    "epoch_event",
    "explain_decision",
    "gradient_stats",
    "load_profile",
    "load_profile_file",
    "loss_sharpness",
    "lstm_hidden_stats",
    "make_backends",
    "materialize",
    "per_class_metrics",
    "phase",
    "profiles_dir",
    "trace_run",
    "weight_norms",
]
