"""Checks on proto/: generated code is current, the wire format only grows, every field is
documented, units are in names, times are Timestamps."""

from __future__ import annotations

import filecmp
import importlib
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402
import wire_lock  # noqa: E402

FDP = descriptor_pb2.FieldDescriptorProto


def _installed_v1() -> Path:
    """Where `import evcore.v1` finds the generated code (editable install: python/evcore/v1)."""
    spec = importlib.util.find_spec("evcore.v1")
    if spec is None or not spec.submodule_search_locations:
        return ROOT / "python" / "evcore" / "v1"
    return Path(next(iter(spec.submodule_search_locations)))


GENERATED = _installed_v1()


@pytest.fixture(scope="module")
def fds() -> descriptor_pb2.FileDescriptorSet:
    return wire_lock.describe()


def _generated_files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """The generated code Python imports must be exactly what protoc makes from proto/ now
    (run `make proto`)."""
    gen_proto.generate(tmp_path)
    fresh = _generated_files(tmp_path / "evcore" / "v1")
    assert fresh, "no code generated from proto/"
    assert GENERATED.is_dir(), f"{GENERATED} missing: run `make proto`"
    current = _generated_files(GENERATED)
    missing = sorted(fresh.keys() - current.keys())
    stale = sorted(current.keys() - fresh.keys())
    differ = sorted(
        name
        for name in fresh.keys() & current.keys()
        if not filecmp.cmp(fresh[name], current[name], shallow=False)
    )
    assert not (missing or stale or differ), (
        f"generated code disagrees with proto/ (run `make proto`): missing={missing} "
        f"stale={stale} differ={differ}"
    )


def test_generated_check_detects_drift(tmp_path: Path) -> None:
    """The comparison above is not vacuous: editing a .proto changes the generated code."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    gen_proto.generate(tmp_path / "a")
    proto_copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_copy)
    f = proto_copy / "evcore" / "v1" / "plan.proto"
    f.write_text(
        f.read_text().replace(
            "double step_s = 4;", "double step_s = 4;\n  // x\n  bool extra = 99;"
        )
    )
    old = gen_proto.PROTO
    try:
        gen_proto.PROTO = proto_copy
        gen_proto.generate(tmp_path / "b")
    finally:
        gen_proto.PROTO = old
    a = (tmp_path / "a" / "evcore" / "v1" / "plan_pb2.py").read_bytes()
    b = (tmp_path / "b" / "evcore" / "v1" / "plan_pb2.py").read_bytes()
    assert a != b


def test_wire_format_matches_lock(fds: descriptor_pb2.FileDescriptorSet) -> None:
    breaking, additive = wire_lock.compare(wire_lock.load_lock(), wire_lock.snapshot(fds))
    assert not breaking, f"breaking wire changes: {breaking}"
    assert not additive, (
        f"additive changes not yet accepted (run `python3 tools/wire_lock.py --update` and commit "
        f"proto/wire.lock.json): {additive}"
    )


def _edited_snapshot(tmp_path: Path, file: str, old: str, new: str) -> dict[str, Any]:
    proto_copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_copy)
    f = proto_copy / "evcore" / "v1" / file
    text = f.read_text()
    assert old in text, f"test edit anchor {old!r} not in {file}"
    f.write_text(text.replace(old, new))
    snap: dict[str, Any] = wire_lock.snapshot(wire_lock.describe(proto_copy))
    return snap


@pytest.mark.parametrize(
    ("file", "old", "new", "expect"),
    [
        ("setpoint.proto", "optional double setpoint_a = 2;", "", "removed without reserving"),
        (
            "setpoint.proto",
            "optional double setpoint_a = 2;",
            "optional double setpoint_a = 20;",
            "renumbered 2 -> 20",
        ),
        (
            "setpoint.proto",
            "optional double setpoint_a = 2;",
            "optional float setpoint_a = 2;",
            "changed type",
        ),
        (
            "setpoint.proto",
            "string decision_id = 6;",
            "repeated string decision_id = 6;",
            "changed label",
        ),
        ("setpoint.proto", "string decision_id = 6;", "string decision = 6;", "changed name"),
        (
            "setpoint.proto",
            "BINDING_REASON_CURTAILMENT = 6;",
            "BINDING_REASON_CURTAILMENT = 16;",
            "renumbered 6 -> 16",
        ),
        ("tariff.proto", "DemandCharge", "DemandTariff", "message .evcore.v1.DemandCharge removed"),
        ("grid.proto", "    Curtailment curtailment = 3;\n", "", "removed without reserving"),
    ],
)
def test_breaking_changes_are_detected(
    tmp_path: Path, file: str, old: str, new: str, expect: str
) -> None:
    breaking, _ = wire_lock.compare(
        wire_lock.load_lock(), _edited_snapshot(tmp_path, file, old, new)
    )
    assert any(expect in b for b in breaking), breaking


def test_additive_changes_and_reserved_removals_are_not_breaking(tmp_path: Path) -> None:
    # Field 7 (objective) goes away with its number reserved; a new field 11 arrives.
    snap = _edited_snapshot(
        tmp_path,
        "plan.proto",
        "  double objective = 7;\n",
        "  reserved 7;\n  double objective_eur = 11;\n",
    )
    breaking, additive = wire_lock.compare(wire_lock.load_lock(), snap)
    assert breaking == []
    assert additive == [".evcore.v1.Plan.objective_eur = 11 added"]


Locations = dict[tuple[int, ...], descriptor_pb2.SourceCodeInfo.Location]


def _comment(locations: Locations, path: tuple[int, ...]) -> str:
    loc = locations.get(path)
    if loc is None:
        return ""
    return str(loc.leading_comments + loc.trailing_comments).strip()


def _undocumented(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Every message, field, oneof, enum, enum value, service and method without a comment.

    Paths follow descriptor.proto: FileDescriptorProto message_type=4, enum_type=5, service=6;
    DescriptorProto field=2, nested_type=3, enum_type=4, oneof_decl=8; EnumDescriptorProto
    value=2; ServiceDescriptorProto method=2."""
    undocumented: list[str] = []
    for fd in fds.file:
        if not fd.name.startswith("evcore/"):
            continue
        locs = {tuple(loc.path): loc for loc in fd.source_code_info.location}

        def need(path: tuple[int, ...], what: str, locs: Locations = locs) -> None:
            if not _comment(locs, path):
                undocumented.append(what)

        def walk_enum(e: Any, path: tuple[int, ...], prefix: str) -> None:
            name = f"{prefix}.{e.name}"
            need(path, f"enum {name}")
            for i, v in enumerate(e.value):
                need((*path, 2, i), f"enum value {name}.{v.name}")

        def walk(m: Any, path: tuple[int, ...], prefix: str) -> None:
            name = f"{prefix}.{m.name}"
            need(path, f"message {name}")
            for i, f in enumerate(m.field):
                need((*path, 2, i), f"field {name}.{f.name}")
            synthetic = {f.oneof_index for f in m.field if f.proto3_optional}
            for i, o in enumerate(m.oneof_decl):
                if i not in synthetic:  # `optional x` makes a hidden oneof `_x`
                    need((*path, 8, i), f"oneof {name}.{o.name}")
            for i, nested in enumerate(m.nested_type):
                walk(nested, (*path, 3, i), name)
            for i, e in enumerate(m.enum_type):
                walk_enum(e, (*path, 4, i), name)

        for i, m in enumerate(fd.message_type):
            walk(m, (4, i), fd.package)
        for i, e in enumerate(fd.enum_type):
            walk_enum(e, (5, i), fd.package)
        for i, svc in enumerate(fd.service):
            need((6, i), f"service {fd.package}.{svc.name}")
            for j, meth in enumerate(svc.method):
                need((6, i, 2, j), f"rpc {fd.package}.{svc.name}.{meth.name}")
    return undocumented


def test_every_message_field_enum_value_and_rpc_is_documented(
    fds: descriptor_pb2.FileDescriptorSet,
) -> None:
    undocumented = _undocumented(fds)
    assert not undocumented, f"{len(undocumented)} undocumented: {undocumented}"


def test_documentation_check_catches_a_missing_comment(tmp_path: Path) -> None:
    """Not vacuous: strip one comment of each kind and the check names exactly those."""
    proto_copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_copy)
    edits = {
        "setpoint.proto": [
            "  // The binding constraint in words a person can read",
            "  // A grid curtailment in force.\n",
        ],
        "status.proto": ["  // Energy is flowing (1.6 Charging).\n"],
    }
    for name, anchors in edits.items():
        f = proto_copy / "evcore" / "v1" / name
        text = f.read_text()
        for anchor in anchors:
            line_start = text.index(anchor)
            line_end = text.index("\n", line_start) + 1
            text = text[:line_start] + text[line_end:]
        f.write_text(text)
    found = _undocumented(wire_lock.describe(proto_copy))
    assert sorted(found) == [
        "enum value evcore.v1.BindingReason.BINDING_REASON_CURTAILMENT",
        "enum value evcore.v1.ConnectorState.CONNECTOR_STATE_CHARGING",
        "field evcore.v1.Setpoint.reason",
    ], found


UNIT_SUFFIXES = (
    "_a",
    "_w",
    "_kw",
    "_kwh",
    "_wh",
    "_v",
    "_s",
    "_hz",
    "_percent",
    "_per_kwh",
    "_per_kw",
    "_ratio",
)
# A ratio; a cost in the tariff's currency; a rank.
UNITLESS = {"efficiency", "objective", "priority"}


def _all_messages(fds: descriptor_pb2.FileDescriptorSet) -> list[Any]:
    """Every message of our files, nested ones included (map entries are protoc's own)."""
    found: list[Any] = []

    def walk(m: Any) -> None:
        found.append(m)
        for nested in m.nested_type:
            if not nested.options.map_entry:
                walk(nested)

    for fd in fds.file:
        if fd.name.startswith("evcore/"):
            for m in fd.message_type:
                walk(m)
    return found


def test_units_in_numeric_field_names(fds: descriptor_pb2.FileDescriptorSet) -> None:
    bad: list[str] = []
    for m in _all_messages(fds):
        for f in m.field:
            if f.type in (FDP.TYPE_DOUBLE, FDP.TYPE_FLOAT) and not (
                f.name.endswith(UNIT_SUFFIXES) or f.name in UNITLESS
            ):
                bad.append(f"{m.name}.{f.name}")
    assert not bad, f"numeric fields without a unit in their name: {bad}"


TIME_NAMES = ("time", "start", "end", "departure", "step_start", "valid_until")


def test_times_are_timestamps(fds: descriptor_pb2.FileDescriptorSet) -> None:
    bad: list[str] = []
    for m in _all_messages(fds):
        for f in m.field:
            timeish = f.name.endswith(("_at", "_time")) or f.name in TIME_NAMES
            if timeish and f.type_name != ".google.protobuf.Timestamp":
                bad.append(f"{m.name}.{f.name}")
    assert not bad, f"time fields that are not google.protobuf.Timestamp: {bad}"


def test_unit_and_time_checks_reach_nested_messages(tmp_path: Path) -> None:
    """Not vacuous: a unitless double and an epoch-seconds time, in a nested message, are named."""
    proto_copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", proto_copy)
    f = proto_copy / "evcore" / "v1" / "plan.proto"
    text = f.read_text()
    anchor = "message Plan {\n"
    assert anchor in text
    nested = (
        "message Plan {\n  // x\n  message Slot {\n    // x\n    double energy = 1;\n"
        "    // x\n    int64 start = 2;\n  }\n"
    )
    f.write_text(text.replace(anchor, nested))
    edited = wire_lock.describe(proto_copy)
    with pytest.raises(AssertionError, match=r"\['Slot\.energy'\]"):
        test_units_in_numeric_field_names(edited)
    with pytest.raises(AssertionError, match=r"\['Slot\.start'\]"):
        test_times_are_timestamps(edited)


def test_every_file_is_in_the_versioned_package_of_its_directory(
    fds: descriptor_pb2.FileDescriptorSet,
) -> None:
    """proto/evcore/v<N>/x.proto declares ``package evcore.v<N>`` (a breaking change is a new
    directory and package, never an edit of v1)."""
    ours = [fd for fd in fds.file if fd.name.startswith("evcore/")]
    assert ours, "no .proto files under proto/evcore/"
    bad = [
        f"{fd.name}: package {fd.package!r}"
        for fd in ours
        if not (
            re.fullmatch(r"evcore\.v[1-9][0-9]*", fd.package)
            and fd.name.rsplit("/", 1)[0] == fd.package.replace(".", "/")
        )
    ]
    assert not bad, f"files outside their versioned package: {bad}"


# What issue 3 asks the contracts to carry: message -> fields it must have.
REQUIRED_MESSAGES: dict[str, set[str]] = {
    "SiteTopology": {"nodes", "chargers"},
    "ChargerStatus": {"charger_id"},
    "MeterSample": {"charger_id", "sampled_at", "current_a", "power_w", "energy_register_wh"},
    "TransactionEvent": {"transaction_id", "kind"},
    "Setpoint": {"charger_id", "setpoint_a", "setpoint_w", "binding", "reason", "decision_id"},
    "Plan": {"rows", "plan_version"},
    "PlanRow": {"session_id", "charger_id", "step_start", "step_s", "target_a", "target_w"},
    "Tariff": {"prices"},
    "PriceInterval": {"start", "price_per_kwh"},
    "GridSignal": {"curtailment", "price_update"},
    "Curtailment": {"node_id", "max_kw", "start", "end"},
    "PriceUpdate": {"tariff"},
    "AuditRecord": {"decision_id", "setpoints", "prev_hash", "hash"},
    "Event": {"event_id", "site_id", "time"},
}


def test_the_contract_set_of_issue_3_is_present(fds: descriptor_pb2.FileDescriptorSet) -> None:
    messages = {m.name: {f.name for f in m.field} for m in _all_messages(fds)}
    missing = {
        name: sorted(fields - messages.get(name, set()))
        for name, fields in REQUIRED_MESSAGES.items()
        if name not in messages or fields - messages[name]
    }
    assert not missing, f"contract messages or fields missing: {missing}"
    services = {
        s.name: [meth.name for meth in s.method]
        for fd in fds.file
        if fd.name.startswith("evcore/")
        for s in fd.service
    }
    # The gRPC services the edge exposes now and the cloud will expose.
    assert services.get("EdgeApi") and services.get("CloudApi"), services


def test_event_envelope_roundtrip_every_payload() -> None:
    from evcore.v1 import event_pb2

    oneof = event_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"]
    assert len(oneof.fields) >= 10
    for field in oneof.fields:
        ev = event_pb2.Event(event_id=f"id-{field.name}", site_id="depot")
        if field.type == field.TYPE_BYTES:
            setattr(ev, field.name, b"x")  # audit_zlib: compressed record bytes
        else:
            getattr(ev, field.name).SetInParent()
        back = event_pb2.Event.FromString(ev.SerializeToString())
        assert back.WhichOneof("payload") == field.name
        assert back.event_id == f"id-{field.name}"


def test_generated_modules_import_with_stubs() -> None:
    """Every .proto under proto/ has its message and gRPC modules, each with a type stub."""
    names = sorted(p.stem for p in (ROOT / "proto" / "evcore" / "v1").glob("*.proto"))
    assert len(names) >= 10, names
    for name in names:
        for module in (f"{name}_pb2", f"{name}_pb2_grpc"):
            spec = importlib.util.find_spec(f"evcore.v1.{module}")
            assert spec is not None and spec.origin is not None, module
            assert Path(spec.origin).with_suffix(".pyi").exists(), f"no type stub for {module}"
            importlib.import_module(f"evcore.v1.{module}")
