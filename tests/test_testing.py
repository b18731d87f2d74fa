"""bgtrace.testing: the ``bgtasks`` fixture records what was queued and what became of it."""

from __future__ import annotations

import functools
import textwrap

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

import bgtrace
from bgtrace import instrumentation
from bgtrace.testing import BackgroundTaskRecorder, record_tasks
from tests import apps
from tests.conftest import Samples
from tests.servers import serve_in_thread


def send_email(to: str, subject: str = "Welcome", *, cc: tuple[str, ...] = ()) -> None:
    apps.done.append(f"mail to {to}")


def signup_app(**middleware: object) -> FastAPI:
    app = FastAPI()
    if middleware:
        app.add_middleware(bgtrace.BackgroundTaskMiddleware, **middleware)  # type: ignore[arg-type]

    @app.post("/signup/{email}")
    def signup(email: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_email, email, subject="Hello")
        return {"status": "ok"}

    return app


def test_assert_queued_takes_the_callable_or_its_name_and_arguments_either_way(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    TestClient(signup_app(registry=registry)).post("/signup/a@example.com")
    found = bgtasks.assert_queued(send_email)
    assert found.state == "completed" and found.origin == "handler"
    assert found.route == "/signup/{email}"
    # Positional as queued, or by name; defaults count as what the function received.
    bgtasks.assert_queued(send_email, "a@example.com")
    bgtasks.assert_queued(send_email, to="a@example.com", subject="Hello")
    bgtasks.assert_queued("tests.test_testing.send_email", to="a@example.com", cc=())
    bgtasks.assert_not_queued(send_email, to="b@example.com")
    bgtasks.assert_not_queued(apps.write_log)


def test_assert_queued_failure_lists_what_was_queued(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    TestClient(signup_app(registry=registry)).post("/signup/a@example.com")
    with pytest.raises(AssertionError) as failure:
        bgtasks.assert_queued(send_email, to="b@example.com")
    assert str(failure.value) == (
        "expected tests.test_testing.send_email(to='b@example.com', ...) to be queued as a "
        "background task; queued while the test ran (1):\n"
        "  tests.test_testing.send_email('a@example.com', subject='Hello')  "
        "origin=handler route=/signup/{email}  completed"
    )


def test_assert_not_queued_failure_shows_the_matching_tasks(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    TestClient(signup_app(registry=registry)).post("/signup/a@example.com")
    with pytest.raises(AssertionError, match=r"not to be queued.*queued 1 time\(s\):\n  tests"):
        bgtasks.assert_not_queued(send_email, "a@example.com")


def test_assert_queued_with_nothing_queued_says_so(bgtasks: BackgroundTaskRecorder) -> None:
    with pytest.raises(AssertionError, match="no background task was queued"):
        bgtasks.assert_queued(send_email)


def test_arguments_of_a_partial_and_of_var_keywords_match_as_the_function_receives_them(
    bgtasks: BackgroundTaskRecorder,
) -> None:
    def notify(*targets: str, **options: object) -> None:
        pass

    tasks = BackgroundTasks()
    tasks.add_task(functools.partial(send_email, subject="Hi"), "a@example.com")
    tasks.add_task(notify, "x", "y", urgent=True, retries=3)
    bgtasks.assert_queued(send_email, "a@example.com")
    bgtasks.assert_queued(notify, "x", urgent=True)
    bgtasks.assert_not_queued(notify, "y")
    bgtasks.assert_not_queued(notify, urgent=False)


def test_states_read_back_filtered_by_task_route_reason_and_error(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    client = TestClient(apps.dropping_app(registry=registry), raise_server_exceptions=False)
    client.post("/fail-first")
    client.post("/raise-http")
    assert [t.name for t in bgtasks.failed(error=ValueError)] == ["tests.apps.fail"]
    assert bgtasks.failed(error=KeyError) == []
    failure = bgtasks.failed()[0]
    assert isinstance(failure.error, ValueError) and failure.error_type == "ValueError"
    assert [t.route for t in bgtasks.dropped(reason="request_error")] == ["/raise-http"]
    assert [t.args for t in bgtasks.dropped(reason="earlier_task_failed")] == [("skipped",)]
    assert len(bgtasks.queued()) == 3
    assert len(bgtasks.queued(task=apps.write_log)) == 2
    assert bgtasks.queued(route="/raise-http", origin="handler")[0].args == ("never",)
    assert bgtasks.completed() == []


def test_records_tasks_of_an_app_without_the_middleware(bgtasks: BackgroundTaskRecorder) -> None:
    TestClient(signup_app()).post("/signup/a@example.com")
    found = bgtasks.assert_queued(send_email, "a@example.com")
    # Without the middleware there is no request to attribute the task to.
    assert (found.origin, found.route, found.state) == ("other", "none", "completed")


def test_records_tasks_run_by_a_real_server_in_the_same_process(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    with serve_in_thread(signup_app(registry=registry)) as url:
        assert httpx.post(f"{url}/signup/a@example.com", timeout=10).status_code == 200
        bgtasks.wait()
    assert bgtasks.completed(task=send_email)[0].args == ("a@example.com",)


def test_recording_instruments_for_the_block_and_restores_the_previous_state() -> None:
    bgtrace.uninstrument()
    with record_tasks() as recorder:
        assert instrumentation.is_instrumented()
        BackgroundTasks().add_task(send_email, "a@example.com")
    assert not instrumentation.is_instrumented()
    recorder.assert_queued(send_email)  # what was recorded stays readable
    BackgroundTasks().add_task(send_email, "b@example.com")
    recorder.assert_not_queued(send_email, "b@example.com")


def test_held_tasks_stay_queued_until_run_held_runs_them(
    registry: CollectorRegistry, samples: Samples, bgtasks: BackgroundTaskRecorder
) -> None:
    bgtasks.hold()
    client = TestClient(apps.tutorial_app(registry=registry))
    client.post("/send-notification/a@example.com?q=x")
    assert apps.done == []
    assert [t.name for t in bgtasks.held()] == [
        "tests.apps.write_log",
        "tests.apps.write_notification",
    ]
    # Exactly what the metrics say: queued, neither started nor dropped.
    assert samples.total("bgtask_queue_length") == 2
    assert samples.total("bgtask_dropped_total") == 0
    bgtasks.run_held()
    assert apps.done == ["found query: x\n", "notification to a@example.com: some notification"]
    assert bgtasks.held() == [] and len(bgtasks.completed()) == 2
    assert samples.total("bgtask_queue_length") == 0
    assert samples.total("bgtask_completed_total", outcome="success") == 2


def test_hold_as_a_block_holds_only_inside_it(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    client = TestClient(signup_app(registry=registry))
    with bgtasks.hold():
        client.post("/signup/held@example.com")
    client.post("/signup/run@example.com")
    assert [t.args[0] for t in bgtasks.held()] == ["held@example.com"]
    assert [t.args[0] for t in bgtasks.completed()] == ["run@example.com"]


def test_run_held_runs_every_task_and_raises_the_first_failure_after(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    bgtasks.hold()
    TestClient(apps.dropping_app(registry=registry)).post("/fail-first")
    with pytest.raises(ValueError, match="boom"):
        bgtasks.run_held()
    # Held one by one, the task after the failure is no longer skipped by Starlette.
    assert [t.name for t in bgtasks.failed()] == ["tests.apps.fail"]
    assert [t.name for t in bgtasks.completed()] == ["tests.apps.write_log"]


def test_tasks_still_held_at_the_end_count_dropped_cancelled(
    registry: CollectorRegistry, samples: Samples
) -> None:
    with record_tasks() as recorder:
        recorder.hold()
        TestClient(signup_app(registry=registry)).post("/signup/a@example.com")
        assert samples.total("bgtask_dropped_total") == 0
    assert samples("bgtask_dropped_total", task="tests.test_testing.send_email", origin="handler",
                   route="/signup/{email}", reason="cancelled") == 1  # fmt: skip
    assert samples.total("bgtask_queue_length") == 0
    assert instrumentation.task_hold is None
    assert apps.done == []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the trio installed for other tests is older than anyio wants


@pytest.mark.anyio
async def test_async_test_holds_and_runs_held_tasks_on_its_own_loop(
    registry: CollectorRegistry, bgtasks: BackgroundTaskRecorder
) -> None:
    bgtasks.hold()
    transport = httpx.ASGITransport(app=apps.tutorial_app(registry=registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.post("/send-notification/a@example.com")
    assert apps.done == [] and len(bgtasks.held()) == 1
    with pytest.raises(RuntimeError, match="run_held_async"):
        bgtasks.run_held()
    await bgtasks.run_held_async()
    await bgtasks.wait_async()
    bgtasks.assert_queued(apps.write_notification, "a@example.com")
    assert apps.done == ["notification to a@example.com: some notification"]


def test_plugin_instruments_nothing_until_used_and_does_not_leak_into_the_next_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            from starlette.background import BackgroundTasks
            from bgtrace import inflight, instrumentation

            def send(to):
                pass

            def test_without_the_fixture_nothing_is_instrumented():
                assert not instrumentation.is_instrumented()

            def test_first_holds(bgtasks):
                bgtasks.hold()
                BackgroundTasks().add_task(send, "a")
                assert instrumentation.is_instrumented()

            def test_next_starts_clean(bgtasks):
                assert bgtasks.queued() == []
                assert instrumentation.task_hold is None
                assert len(inflight.observers) == 1
                bgtasks.assert_not_queued(send)

            def test_after_restored():
                assert not instrumentation.is_instrumented()
                assert inflight.observers == ()
                assert instrumentation.task_hold is None
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "bgtrace.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
