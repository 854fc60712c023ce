"""A failing teacher during OPD training with ``teacher.kind: remote`` (the teacher server on
127.0.0.1, faults injected by ``FaultyServer``; the word student, whose samples all align).

- Transient 500s are retried with backoff; the retries and the samples retried are in the step's
  metrics, and the run ends bitwise equal to one with a healthy teacher (nothing lost).
- A teacher that keeps failing from step 3 (answering 500, too slow for ``teacher.timeout``, or
  its server stopped) is retried ``teacher.max_retries`` times, then the CLI stops with exit 1 and
  one ``error:`` naming the URL, the cause, the step and the checkpoint of the state before it;
  the metrics hold a ``teacher_failure`` row with the number of samples not trained on. Resumed
  against a healthy teacher, the run ends bitwise equal to the uninterrupted one: 0 samples lost.
- A teacher whose answers align with no sample is never a silent zero loss: the step is skipped
  and counted (loss logged as NaN, ``unscored_samples`` in the metrics), and ``train.max_bad_steps``
  such steps in a row stop the run with a message saying why.

Requests go one at a time (``teacher.concurrency: 1``) so that the server never batches them
differently from one run to the next and results can be compared bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from core import config as C
from core.bin.train import main as train_main
from core.methods import METHODS
from core.serve.app import ServerThread, create_app
from core.serve.engine import TeacherEngine
from reliability_util import (FaultyServer, assert_bitwise_equal, final_weights, make_word_student, read_metrics,
                              run_in_process, step_rows)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
MAX_STEPS = 4
PER_STEP = 2 * 2  # chat requests per step: prompts x samples


@pytest.fixture(scope="module")
def word_student(tiny, tmp_path_factory):
    return make_word_student(tiny.student, tmp_path_factory.mktemp("word_student") / "model")


@pytest.fixture(scope="module")
def engine(tiny, one_thread):
    eng = TeacherEngine(tiny.teacher, device="cpu")
    yield eng
    eng.executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def served(engine):
    faults = FaultyServer(create_app(engine=engine, batch_wait_ms=2))
    s = ServerThread(faults).start()
    s.faults = faults
    yield s
    s.stop()


@pytest.fixture
def server(served):
    served.faults.reset()
    yield served
    served.faults.reset()


def sections(word_student, url: str, **teacher) -> dict:
    return dict(method="opd", model={"path": str(word_student)},
                teacher={"kind": "remote", "url": url, "retry_backoff": 0.01, "max_retries": 2, "timeout": 10,
                         "concurrency": 1, **teacher},
                rollout={"n": 2, "max_new_tokens": 6}, opd={"form": "distribution", "support": "teacher_topk",
                                                             "top_k": K},
                train={"batch_size": 2, "max_steps": MAX_STEPS, "seed": 0, "resume": "auto"})


@pytest.fixture(scope="module")
def reference(served, word_student, write_config, tmp_path_factory):
    """The same OPD run with a healthy teacher."""
    served.faults.reset()
    cfg = write_config(tmp_path_factory.mktemp("teacher_ref"), "ref", **sections(word_student, served.url))
    run_in_process(cfg)
    out = Path(C.load_config(cfg).output_dir)
    rows = step_rows(out)
    assert len(rows) == MAX_STEPS and all(r["unscored_samples"] == 0 and r["loss"] > 0 for r in rows)
    assert served.faults.chat_calls == MAX_STEPS * PER_STEP
    return out


def test_transient_500s_are_retried_counted_and_change_nothing(server, word_student, train_config, reference):
    cfg = train_config("transient", **sections(word_student, server.url, max_retries=3))
    out = Path(C.load_config(cfg).output_dir)
    server.faults.fail_next = 3  # the first sample fails three times, then is scored
    _, summary = run_in_process(cfg)
    assert summary["steps"] == MAX_STEPS and summary["skipped_steps"] == 0
    rows = step_rows(out)
    assert (rows[0]["teacher/retries"], rows[0]["teacher/retried_samples"]) == (3, 1)
    assert all(r["teacher/retries"] == 0 and r["teacher/retried_samples"] == 0 for r in rows[1:])
    assert all(r["unscored_samples"] == 0 for r in rows)
    assert server.faults.chat_calls == MAX_STEPS * PER_STEP + 3
    assert_bitwise_equal(final_weights(reference), final_weights(out))


@pytest.mark.parametrize("mode", ["500", "slow", "down"])
def test_failing_teacher_stops_clearly_with_a_resumable_checkpoint(mode, served, engine, word_student,
                                                                    train_config, reference, monkeypatch, capsys):
    served.faults.reset()
    if mode == "down":  # a server of its own, stopped as step 3 starts
        own = ServerThread(create_app(engine=engine, batch_wait_ms=2)).start()
        url = own.url
        real = type(METHODS["opd"]).experience
        calls = [0]

        def experience(ctx, rows, seed):
            calls[0] += 1
            if calls[0] == 3:
                own.stop()
            return real(METHODS["opd"], ctx, rows, seed)

        monkeypatch.setattr(METHODS["opd"], "experience", experience)
    else:
        url = served.url
        served.faults.after, served.faults.mode, served.faults.delay = 2 * PER_STEP, mode, 3.0
    cfg = train_config(f"fail_{mode}", **sections(word_student, url, timeout=1.0 if mode == "slow" else 10.0))
    out = Path(C.load_config(cfg).output_dir)
    rc = train_main(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    cause = {"500": "HTTP 500: injected failure", "slow": "no answer within 1 s", "down": "Error"}[mode]
    assert f"error: step 3: the teacher failed: teacher at {url}/v1/chat/completions failed after 3 attempt(s): " \
           in err and cause in err, err[-3000:]
    assert (f"the step's 2 prompt(s) (4 completion(s)) were not trained on; checkpoint "
            f"{out / 'checkpoints' / 'step_2'} holds the state before it") in err
    assert "rerun with train.resume: auto" in err and "Traceback" not in err
    rows = read_metrics(out)
    assert [r["step"] for r in step_rows(out)] == [1, 2]
    events = [r for r in rows if r.get("event") == "teacher_failure"]
    assert len(events) == 1 and events[0]["step"] == 3
    assert events[0]["teacher/failed_samples"] == 4 and events[0]["teacher/retries"] >= 2
    assert not (out / "final").exists()

    # the teacher is back: the run resumes from step_2 and ends as if nothing had happened
    monkeypatch.undo()
    served.faults.reset()
    run_in_process(cfg, f"teacher.url={served.url}")
    assert_bitwise_equal(final_weights(reference), final_weights(out))
    assert [r["step"] for r in step_rows(out)] == list(range(1, MAX_STEPS + 1))
    assert [r["loss"] for r in step_rows(out)] == [r["loss"] for r in step_rows(reference)]
    assert len([r for r in read_metrics(out) if r.get("event") == "teacher_failure"]) == 1  # kept as history


def test_a_teacher_that_scores_nothing_is_never_a_silent_zero_loss(server, word_student, train_config, capsys,
                                                                   caplog):
    server.faults.after, server.faults.mode = 0, "misalign"
    sec = sections(word_student, server.url)
    sec["train"]["max_bad_steps"] = 2
    cfg = train_config("misalign", **sec)
    out = Path(C.load_config(cfg).output_dir)
    assert train_main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert ("error: 2 consecutive steps skipped, the last because the teacher scored none of its samples "
            "(limit train.max_bad_steps=2)") in err, err[-3000:]
    assert "re-tokenises differently" in caplog.text  # the log names the samples that did not align
    (row,) = read_metrics(out)  # step 1, skipped; step 2 stops the run
    assert row["step"] == 1 and row["skipped_steps"] == 1
    assert row["loss"] == "nan" and row["unscored_samples"] == 4 and row["aligned_share"] == 0
    assert not (out / "final").exists()
