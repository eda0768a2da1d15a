"""`batch` and `merge-reports`: a zoo with broken files, shards, timeouts, summaries."""
import csv
import json
import os

import onnx
import onnxruntime as ort
import pytest

from models.builders import BUILDERS
from tests.conftest import SHARED
from udfc_onnx.batch import collect_inputs, merge_summaries, parse_shard, select_shard
from udfc_onnx.cli import main
from udfc_onnx.errors import InvalidConfigError

SMALL = ("conv_chain", "conv_flatten_gemm", "residual_block")


def make_zoo(root, *, shared=True):
    """Builder models (one in a subfolder), the shared ResNet-20 when present, and two broken files."""
    root.mkdir()
    (root / "nested").mkdir()
    for name in SMALL:
        onnx.save(BUILDERS[name](), root / (f"nested/{name}.onnx" if name == "residual_block" else f"{name}.onnx"))
    resnet20 = SHARED / "models" / "cifar10" / "resnet20.onnx"
    if shared and resnet20.exists():
        (root / "resnet20.onnx").symlink_to(resnet20)  # never copied, only linked
    (root / "broken_random.onnx").write_bytes(os.urandom(2048))
    good = (root / "conv_chain.onnx").read_bytes()
    (root / "broken_truncated.onnx").write_bytes(good[: len(good) // 2])
    return root


def test_batch_converts_good_models_and_reports_broken_ones(tmp_path, capsys):
    zoo = make_zoo(tmp_path / "zoo")
    out = tmp_path / "out"
    code = main(["batch", str(zoo), "--out-dir", str(out), "--jobs", "2", "--prune-ratio", "0.25", "--check-n", "2"])
    printed = capsys.readouterr()
    assert code == 1
    summary = json.loads((out / "udfc-summary.json").read_text())
    status = {m["name"]: m["status"] for m in summary["models"]}
    good = [f"{n}.onnx" for n in SMALL if n != "residual_block"] + ["nested/residual_block.onnx"]
    if (zoo / "resnet20.onnx").exists():
        good.append("resnet20.onnx")
    assert status == {**{g: "ok" for g in good}, "broken_random.onnx": "failed", "broken_truncated.onnx": "failed"}
    for name in good:
        onnx.checker.check_model(str(out / name), full_check=True)
        ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
    assert not (out / "broken_random.onnx").exists() and not (out / "broken_truncated.onnx").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the summary printed, one stderr line per broken file, and the CSV
    assert "broken_truncated.onnx" in printed.out and "2 failed" in printed.out and f"{len(good)} ok" in printed.out
    assert sorted(line.split(":")[1].strip() for line in printed.err.strip().splitlines()) == \
        ["broken_random.onnx", "broken_truncated.onnx"]
    rows = list(csv.DictReader((out / "udfc-summary.csv").open()))
    assert [r["name"] for r in rows] == sorted(status)
    ok = next(r for r in rows if r["name"] == "conv_chain.onnx")
    assert int(ok["params_after"]) < int(ok["params_before"]) and int(ok["macs_after"]) < int(ok["macs_before"])
    assert int(ok["bytes_after"]) == (out / "conv_chain.onnx").stat().st_size
    assert next(m for m in summary["models"] if m["name"] == "conv_chain.onnx")["report"]["units"]


def test_shards_partition_the_zoo_and_merge_back(tmp_path, capsys):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    out = tmp_path / "out"
    codes = [main(["batch", str(zoo), "--out-dir", str(out), "--shard", f"{k}/3", "--check-n", "1", "-q"])
             for k in range(3)]
    summaries = sorted(out.glob("udfc-summary.shard-*-of-3.json"))
    assert len(summaries) == 3
    names = [[m["name"] for m in json.loads(p.read_text())["models"]] for p in summaries]
    everything = sorted(n for shard in names for n in shard)
    assert everything == sorted(job.name for job in collect_inputs([str(zoo)], out)) and len(set(everything)) == 5
    assert codes == [1 if any(n.startswith("broken") for n in shard) else 0 for shard in names]
    capsys.readouterr()
    merged = tmp_path / "merged.json"
    assert main(["merge-reports", str(out), "-o", str(merged), "--csv", str(tmp_path / "merged.csv")]) == 1
    printed = capsys.readouterr()
    data = json.loads(merged.read_text())
    assert [m["name"] for m in data["models"]] == sorted(everything) and data["shard"] is None
    assert "2 failed, 3 ok" in printed.out and printed.err == ""  # failures, but no shard problem
    # A missing shard is reported.
    assert main(["merge-reports", str(summaries[0]), str(summaries[2]), "-q"]) == 1
    assert "missing shard(s) 1/3" in capsys.readouterr().err


def test_shard_assignment_is_index_modulo_of_sorted_names(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    jobs = collect_inputs([str(zoo)], tmp_path / "out")
    assert [j.name for j in jobs] == sorted(j.name for j in jobs)
    assert [j.name for j in select_shard(jobs, (1, 2))] == [j.name for j in jobs[1::2]]
    # Same files seen through another path (another machine's mount point): same names, same shards.
    (tmp_path / "mount").symlink_to(zoo)
    again = collect_inputs([str(tmp_path / "mount")], tmp_path / "elsewhere")
    assert [j.name for j in select_shard(again, (1, 2))] == [j.name for j in jobs[1::2]]


def test_dry_run_lists_the_shard_and_writes_nothing(tmp_path, capsys):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    assert main(["batch", str(zoo), "--out-dir", str(tmp_path / "out"), "--shard", "0/2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("dry run: 3 of 5 models in shard 0/2") and "broken_random.onnx" in printed
    assert not (tmp_path / "out").exists()


def test_timeout_stops_the_model_and_leaves_nothing(tmp_path, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    onnx.save(BUILDERS["resnet18"](), zoo / "slow.onnx")
    out = tmp_path / "out"
    # pruning runs the synthetic fit: seconds, where quantization alone now takes about 0.2 s
    assert main(["batch", str(zoo), "--out-dir", str(out), "--timeout", "0.2", "--prune-ratio", "0.5", "-q"]) == 1
    assert "slow.onnx: timeout: stopped after 0.2 s" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["udfc-summary.csv", "udfc-summary.json"]


def test_inputs_as_glob_list_and_missing_file(tmp_path, capsys):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    listing = tmp_path / "models.txt"
    listing.write_text(f"# two models\n{zoo / 'conv_chain.onnx'}\n{tmp_path / 'gone.onnx'}\n")
    out = tmp_path / "out"
    code = main(["batch", f"@{listing}", str(zoo / "nested" / "*.onnx"), "--out-dir", str(out), "-q"])
    assert code == 1
    status = {m["name"]: (m["status"], m["message"]) for m in json.loads((out / "udfc-summary.json").read_text())["models"]}
    assert status == {"conv_chain.onnx": ("ok", ""), "gone.onnx": ("failed", "no such file"),
                      "residual_block.onnx": ("ok", "")}
    capsys.readouterr()


def test_two_inputs_with_one_output_name_are_refused(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        onnx.save(BUILDERS["conv_chain"](), tmp_path / sub / "m.onnx")
    with pytest.raises(InvalidConfigError, match="would both write"):
        collect_inputs([str(tmp_path / "a" / "m.onnx"), str(tmp_path / "b" / "m.onnx")], tmp_path / "out")
    # as folders, their relative paths keep them apart only below each folder: still the same name
    jobs = collect_inputs([str(tmp_path)], tmp_path / "out")
    assert sorted(j.name for j in jobs) == ["a/m.onnx", "b/m.onnx"]


def test_outputs_inside_an_input_folder_are_not_inputs(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    (zoo / "out").mkdir()
    onnx.save(BUILDERS["conv_chain"](), zoo / "out" / "conv_chain.onnx")
    assert "out/conv_chain.onnx" not in [j.name for j in collect_inputs([str(zoo)], zoo / "out")]


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/3"], "--shard must be K/N with 0 <= K < N"),
    (["--shard", "1-of-2"], "--shard must be K/N"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--prune-ratio", "1"], "prune_ratio"),
])
def test_bad_batch_options(tmp_path, capsys, args, message):
    zoo = make_zoo(tmp_path / "zoo", shared=False)
    assert main(["batch", str(zoo), "--out-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_merge_rejects_files_that_are_not_summaries(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InvalidConfigError, match="not a udfc-onnx batch summary"):
        merge_summaries([tmp_path / "x.json"])
    assert parse_shard(None) is None and parse_shard("0/1") == (0, 1)
