"""`fedcare data check`: the folder report and the command's exit codes."""

from __future__ import annotations

import json

from rich.console import Console
from typer.testing import CliRunner

from client.data_check import check_imaging_folder, render
from client.datasets.dicom_reader import ImagePolicy
from fedcare.data_commands import data_app
from tests.support.dicom_files import hospital, ramp, write_dicom

runner = CliRunner()


def text_of(report) -> str:
    console = Console(width=200, record=True)
    console.print(render(report))
    return console.export_text()


def test_clean_folder_is_ok(tmp_path):
    report = check_imaging_folder(hospital(tmp_path / "h"), policy=ImagePolicy(size=16))
    assert report.ok and report.problems == []
    assert (report.files_found, report.readable, report.images, report.labelled) == (6, 6, 6, 6)
    assert report.label_counts == {"0": 3, "1": 3}
    assert report.sizes == {"24 x 24": 3, "32 x 24": 3}
    assert "OK: ready to train" in text_of(report)


def test_missing_labels_file_is_a_problem_but_images_are_scanned(tmp_path):
    root = hospital(tmp_path / "h")
    (root / "labels.csv").unlink()
    report = check_imaging_folder(root)
    assert not report.ok and report.readable == 6
    assert any("labels file not found" in p for p in report.problems)


def test_problems_name_files_reasons_and_keywords_never_values(tmp_path):
    root = hospital(tmp_path / "h", n=4)
    write_dicom(root / "img01.dcm", ramp(), PatientName="Doe^Jane")
    (root / "img02.dcm").write_text("not dicom")
    write_dicom(root / "extra.dcm", ramp())  # unlabelled
    report = check_imaging_folder(root)
    assert not report.ok
    assert report.phi == {"img01.dcm": ["PatientName"]}
    assert report.rejected["img02.dcm"].startswith("not a DICOM file")
    assert report.rejected_by_code == {"not-dicom": 1}
    assert report.unlabelled == ["extra.dcm"]
    assert len(report.problems) == 2
    text = text_of(report)
    for needle in ("img01.dcm", "PatientName", "img02.dcm", "not a DICOM file", "no label"):
        assert needle in text
    assert "Doe" not in text and "Doe" not in json.dumps(report.to_dict())


def test_one_class_is_a_note_not_a_problem(tmp_path):
    report = check_imaging_folder(hospital(tmp_path / "h", n=3, labels=[0, 0, 0]))
    assert report.ok and any("only class 0" in n for n in report.notes)


def test_bad_labels_file_is_reported(tmp_path):
    report = check_imaging_folder(hospital(tmp_path / "h", csv="file;label\nimg00.dcm;1\n"))
    assert not report.ok and any("';' as delimiter" in p for p in report.problems)
    assert report.readable == 6


def test_cli_exit_codes_and_json(tmp_path):
    root = hospital(tmp_path / "h", n=2)
    done = runner.invoke(data_app, ["check", str(root), "--image-size", "16", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["ok"] is True
    (root / "labels.csv").unlink()
    done = runner.invoke(data_app, ["check", str(root)])
    assert done.exit_code == 1 and "labels file not found" in " ".join(done.stdout.split())
    alt = tmp_path / "my-labels.csv"
    alt.write_text("file,label\nimg00.dcm,0\nimg01.dcm,1\n")
    assert runner.invoke(data_app, ["check", str(root), "--labels", str(alt)]).exit_code == 0


def test_cli_usage_errors_exit_2_with_one_line(tmp_path):
    for args, message in [
        ([str(tmp_path / "absent")], "not a folder"),
        ([str(tmp_path), "--multiframe", "all"], "unknown multiframe policy"),
        ([str(tmp_path), "--image-size", "2"], "image size must be an integer"),
    ]:
        done = runner.invoke(data_app, ["check", *args])
        assert done.exit_code == 2, done.output
        assert message in done.stderr and "Traceback" not in done.output
        assert len(done.stderr.strip().splitlines()) == 1


def test_file_and_folder_names_are_printed_as_written_not_as_markup(tmp_path):
    root = hospital(tmp_path / "a[" / "x][bold]", n=2)  # the folder's path holds "a[/x]"
    (root / "bad[kg].dcm").write_bytes(b"DICM? no: not a DICOM file at all")
    (root / "labels.csv").write_text("file,label\nimg00.dcm,0\nimg01.dcm,1\nbad[kg].dcm,1\n")
    done = runner.invoke(data_app, ["check", str(root), "--image-size", "16"])
    text = " ".join(done.output.split())
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
    assert "bad[kg].dcm" in text and "a[/x][bold]" in text and "Traceback" not in text


EHR_SCHEMA = """
[table]
id = "pid"
label = "outcome"

[numeric."dose[kg]"]
range = [0, 10]
"""


def ehr_hospital(folder, rows: int):
    """A clean EHR table of ``rows`` patients (70% of them train) in DATA_ROOT/hospital-0."""
    site = folder / "hospital-0"
    site.mkdir(parents=True)
    lines = ["pid,dose[kg],outcome"] + [f"P{i},{i % 10}.5,{i % 2}" for i in range(rows)]
    (site / "table.csv").write_text("\n".join(lines) + "\n")
    (site / "schema.toml").write_text(EHR_SCHEMA)
    return site


def test_ehr_check_refuses_what_simulate_refuses_at_the_run_batch_size(tmp_path):
    from fedcare.cli import app

    site = ehr_hospital(tmp_path / "root", rows=40)  # 28 training rows; default batch 30
    args = ["data", "check", str(site / "table.csv"), "--schema", str(site / "schema.toml")]
    checked = runner.invoke(app, args)
    simulated = runner.invoke(
        app,
        [
            "simulate",
            "--dataset",
            "ehr-table",
            "--data-root",
            str(tmp_path / "root"),
            "--rounds",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
        ],
    )
    for done in (checked, simulated):
        text = " ".join(done.output.split())
        assert done.exit_code == 1, done.output
        assert "has 28 training samples, fewer than one batch (30)" in text
        # under DP a tiny batch is no fix: never suggested
        assert "lower batch-size" not in text and "too few rows for DP training at batch size 30" in text
    ok = runner.invoke(app, [*args, "--batch-size", "16"])
    assert ok.exit_code == 0 and "28 training rows, batch size 16, DP-SGD" in ok.output, ok.output
    plain = runner.invoke(app, [*args, "--no-dp"])
    assert plain.exit_code == 1 and "lower batch-size to at most 28" in " ".join(plain.output.split())
