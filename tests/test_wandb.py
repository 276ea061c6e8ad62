"""W&B for a study, offline through the CLI: group, job type and tags to sort runs by, summary.json's final
numbers in the run summary, a failed run marked so, the `wandb sync` command printed, no history block."""

import json
import re
from pathlib import Path

from tests.conftest import REPO, clean_env, run_cli, run_summaries

SYNC = re.compile(r"^W&B logged offline; upload with: wandb sync (\S+)$", re.MULTILINE)


def wandb_records(path: Path) -> dict:
    """The run, summary and exit records of an offline run's .wandb file (LevelDB-style log: a 7-byte file
    header, 32 KiB blocks, each record chunk behind a 7-byte header: CRC, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending, found = 7, b"", {"summary": {}}
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # a record's first or middle chunk; 1 = whole, 4 = last
            continue
        record = wandb_internal_pb2.Record.FromString(pending)
        pending, record_type = b"", record.WhichOneof("record_type")
        if record_type == "summary":
            for item in record.summary.update:
                found["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif record_type in ("run", "exit"):
            found[record_type] = getattr(record, record_type)
    return found


def offline_run(result) -> tuple[Path, dict]:
    """The offline run folder the output names with its `wandb sync` command, and its records."""
    (printed,) = SYNC.findall(result.stderr)
    folder = Path(printed)
    assert folder.is_dir() and folder.name.startswith("offline-run-")
    (history_file,) = folder.glob("run-*.wandb")
    return folder, wandb_records(history_file)


def test_a_recipe_run_is_grouped_tagged_and_summarised_and_prints_its_sync_command(workdir):
    env = clean_env(workdir)
    del env["WANDB_SILENT"]  # W&B's own console output as a user sees it
    result = run_cli(
        "experiment=digits_kd", "trainer.max_epochs=1", "logger=wandb", "logger.tags=[study]",
        cwd=workdir, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = run_summaries(workdir)
    folder, records = offline_run(result)
    assert folder.parent == Path(summary["output_dir"]) / "wandb"
    run = records["run"]
    assert run.job_type == "kd" and run.run_group == "digits_kd"
    tags = list(run.tags)
    assert tags[0] == "study" and {"method:kd", "dataset:digits", "recipe:digits_kd"} <= set(tags), tags
    assert {"teacher:convnet_wide", "student:convnet_narrow"} <= set(tags), tags
    final = records["summary"]
    for key in ("student_top1_reported", "student_top1_best", "teacher_top1", "epochs", "steps", "report"):
        assert final[key] == summary[key], key
    assert final["status"] == "completed" and "history" not in final
    assert records["exit"].exit_code == 0
    output = result.stdout + result.stderr
    assert "Run history" not in output and "Run summary" not in output
    assert len(re.findall(r"^wandb: ", output, re.MULTILINE)) <= 4, output  # the offline notice, no footer


def test_an_interrupted_plain_run_ends_its_wandb_run_failed_with_no_group(workdir):
    env = clean_env(workdir) | {"PYTHONPATH": str(REPO)}  # tests.faults
    result = run_cli(
        "trainer.max_epochs=1", "logger=wandb",
        "+callbacks.fault._target_=tests.faults.SignalOnce", "+callbacks.fault.signal=SIGTERM",
        "+callbacks.fault.epoch=0", "+callbacks.fault.batch=2", f"+callbacks.fault.marker={workdir}/fired",
        cwd=workdir, env=env,
    )  # fmt: skip
    assert result.returncode == 128 + 15, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: stopped by SIGTERM")
    _, records = offline_run(result)  # printed for an interrupted run too: its epochs can be uploaded
    assert records["run"].run_group == "" and records["run"].job_type == "kd"
    assert records["summary"]["status"] == "interrupted" and "student_top1_reported" not in records["summary"]
    assert records["exit"].exit_code == 128 + 15  # W&B shows the run failed, with the process's exit code
