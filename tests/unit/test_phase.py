"""The pure failure decisions of `nebula.core.phase`: which line explains a failure, whether a crashed engine
is started again, and the one-line phase message every reader shows."""

from __future__ import annotations

from nebula.core.model import Phase
from nebula.core.phase import Failures, error_line, observe_phase, repeated, restart_verdict
from nebula.core.units import UnitState, UnitStatus

# The tail of a vLLM start refused by its config (pydantic wraps vLLM's ValueError), then the supervisor's
# epilogue: what the process back-end's log file holds (pids and times differ on every run).
VLLM_CONFIG_REFUSED = [
    "(APIServer pid=4242) Traceback (most recent call last):",
    '(APIServer pid=4242)   File "/opt/nebula/engines/vllm/bin/vllm", line 10, in <module>',
    "(APIServer pid=4242)     sys.exit(main())",
    "(APIServer pid=4242) pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "(APIServer pid=4242)   Value error, User-specified max_model_len (2048) is greater than the derived "
    "max_model_len (max_position_embeddings=512 or model_max_length=None in model's config.json). "
    "[type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]",
    "(APIServer pid=4242)     For further information visit https://errors.pydantic.dev/2.11/v/value_error",
    "2025-01-31 12:00:01,123 ERROR nebula.engine: engine exited unexpectedly with status 1 "
    "NEBULA_INSTANCE=bge NEBULA_MODEL=bge",
]
ENGINE_CORE_DIED = [
    "(EngineCore_DP0 pid=77) ERROR 01-31 12:00:00 [core.py:708] EngineCore failed to start.",
    "(EngineCore_DP0 pid=77) ERROR 01-31 12:00:00 [core.py:708] Traceback (most recent call last):",
    "(EngineCore_DP0 pid=77) ERROR 01-31 12:00:00 [core.py:708] torch.OutOfMemoryError: CUDA out of memory. "
    "Tried to allocate 2.00 GiB",
    "(APIServer pid=76) Traceback (most recent call last):",
    "(APIServer pid=76) RuntimeError: Engine core initialization failed. See root cause above. "
    "Failed core proc(s): {}",
]


def failed(result: str = "exit-code:1") -> UnitStatus:
    return UnitStatus("a", UnitState.FAILED, result=result)


def test_error_line_is_the_last_meaningful_error() -> None:
    assert error_line(VLLM_CONFIG_REFUSED) == (
        "ValueError: User-specified max_model_len (2048) is greater than the derived max_model_len "
        "(max_position_embeddings=512 or model_max_length=None in model's config.json).")
    # A wrapper pointing at its root cause gives way to the root cause; run-specific prefixes are gone.
    assert error_line(ENGINE_CORE_DIED) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert error_line(["ValueError: bad"]) == "ValueError: bad"
    assert error_line(["Killed"]) == "Killed"
    assert error_line([]) == ""


def test_error_line_without_a_traceback_falls_back_to_nebulas_own_error() -> None:
    lines = ["some vLLM chatter", "2025-01-31 12:00:01,123 ERROR nebula.engine: engine not healthy after 600 s "
             "(engine.startup_timeout_s) NEBULA_INSTANCE=a"]
    assert error_line(lines) == "engine not healthy after 600 s (engine.startup_timeout_s)"


def test_error_line_of_a_refused_command_line_is_argparses_own() -> None:
    # What vLLM 0.32 prints for `vllm serve MODEL --dtype float13` (exit status 2), then the supervisor's epilogue.
    lines = ["usage: vllm serve [model_tag] [options]",
             "vllm serve: error: argument --dtype: invalid choice: 'float13' (choose from 'auto', 'bfloat16', "
             "'float', 'float16', 'float32', 'half')",
             "2026-12-04 18:40:01,123 ERROR nebula.engine: engine exited unexpectedly with status 2 NEBULA_INSTANCE=a"]
    assert error_line(lines) == ("vllm serve: error: argument --dtype: invalid choice: 'float13' (choose from "
                                 "'auto', 'bfloat16', 'float', 'float16', 'float32', 'half')")
    assert error_line(["INFO 12-04 18:40:00 [api_server.py:1] vLLM API server version 0.32.0"]) == (
        "vLLM API server version 0.32.0"), "an ordinary log line is no usage error"


def test_error_line_is_one_bounded_line() -> None:
    line = error_line(["ValueError: " + "x" * 1000])
    assert len(line) <= 300 and "\n" not in line and line.endswith("...")


def test_the_same_error_twice_is_not_restarted() -> None:
    assert not repeated(["ValueError: a"])
    assert repeated(["ValueError: a", "ValueError: a"])
    assert not repeated(["ValueError: a", "ValueError: b"])
    assert not repeated(["", ""]), "nothing known is not the same error"
    assert restart_verdict(["ValueError: a"], agent_restarts=True, budget_left=True)
    assert not restart_verdict(["ValueError: a"] * 2, agent_restarts=True, budget_left=True)
    assert not restart_verdict(["ValueError: a"], agent_restarts=True, budget_left=False)
    assert not restart_verdict(["ValueError: a"], agent_restarts=False, budget_left=True), "systemd restarts it"


def test_failed_engine_phase_is_one_line_with_the_one_restart_count() -> None:
    restarting = Failures(restarts=2, errors=("RuntimeError: a", "RuntimeError: b", "RuntimeError: c"),
                          restarting=True)
    assert observe_phase(blocked=None, unit=failed(), healthy=False, failures=restarting) == (
        Phase.STARTING, "engine exited (exit-code:1): RuntimeError: c; restarting (2 so far)")
    spent = Failures(restarts=5, errors=tuple(f"RuntimeError: {i}" for i in range(6)))
    assert observe_phase(blocked=None, unit=failed(), healthy=False, failures=spent) == (
        Phase.FAILED, "engine unit failed (exit-code:1) after 5 restart(s): RuntimeError: 5")
    twice = Failures(restarts=1, errors=("ValueError: bad arg", "ValueError: bad arg"))
    assert observe_phase(blocked=None, unit=failed(), healthy=False, failures=twice) == (
        Phase.FAILED, "ValueError: bad arg (the same error twice: not restarted)")
    unknown = observe_phase(blocked=None, unit=failed("start-limit-hit"), healthy=False)
    assert unknown == (Phase.FAILED, "engine unit failed (start-limit-hit) after 0 restart(s)")


def test_under_systemd_a_failure_shows_between_restarts_and_a_stopped_one_is_failed() -> None:
    waiting = UnitStatus("bge", UnitState.ACTIVATING, sub_state="auto-restart", restarts=1, result="exit-code")
    failures = Failures(restarts=1, errors=("ValueError: bad length",))
    assert observe_phase(blocked=None, unit=waiting, healthy=False, failures=failures) == (
        Phase.STARTING, "engine exited (exit-code): ValueError: bad length; systemd restarts it (1 so far)")
    starting = UnitStatus("bge", UnitState.ACTIVATING, sub_state="start")
    assert observe_phase(blocked=None, unit=starting, healthy=False) == (Phase.STARTING, "loading model")
    stopped = Failures(restarts=2, errors=("ValueError: bad length",) * 2, stopped=True)
    assert observe_phase(blocked=None, unit=None, healthy=False, failures=stopped) == (
        Phase.FAILED, "ValueError: bad length (the same error twice: not restarted)")
