"""Configuration of the ingest stage (``ingest:`` in the YAML config)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.section import Section

__all__ = [
    "SplitConfig",
    "DeidOptions",
    "SafePrivateElement",
    "BlankRegion",
    "BurnedInConfig",
    "ExecutorConfig",
    "IngestConfig",
]

# A Dask scheduler address: protocol://host[:port] (tcp, tls, ucx, ws, wss, inproc).
_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://[^\s/]+$")


class SplitConfig(Section):
    """Fractions of subjects per split (stratified by label), and the split's seed."""

    train: float = Field(0.6, ge=0.0, le=1.0)
    val: float = Field(0.2, ge=0.0, le=1.0)
    test: float = Field(0.2, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class SafePrivateElement(Section):
    """One private element that may be kept (Retain Safe Private Option): creator + element offset."""

    creator: str = Field(..., min_length=1, description="Private creator string, e.g. 'SIEMENS CSA HEADER'.")
    group: int | None = Field(None, description="Odd group number (e.g. 0x0029); None: any group.")
    element: int = Field(..., ge=0x00, le=0xFF, description="Element offset in the block (0x00-0xFF).")

    @field_validator("group")
    @classmethod
    def _odd_group(cls, value: int | None) -> int | None:
        if value is not None and (value % 2 == 0 or not 0x0009 <= value <= 0xFFFF):
            raise ValueError("a private group is odd and between 0x0009 and 0xFFFF")
        return value


class DeidOptions(Section):
    """Options of PS3.15 Table E.1-1 on top of the Basic Application Level Confidentiality Profile."""

    modified_dates: bool = Field(
        True,
        description="Retain Longitudinal Temporal Information with Modified Dates: every date, date-time and time "
        "of a patient moves back by the same keyed offset (200-210 years plus a part of a day; a date and its time "
        "as one instant), so intervals stay exact. False: dates and times follow the basic profile (removed).",
    )
    patient_characteristics: bool = Field(
        False, description="Retain Patient Characteristics: keep age, sex, size, weight, ethnic group, pregnancy, smoking."
    )
    device_identity: bool = Field(False, description="Retain Device Identity: keep device/station/detector IDs and serials.")
    clean_descriptors: bool = Field(
        False,
        description="Clean Descriptors: keep descriptions/comments after removing the patient's known identifiers. "
        "Off: descriptions are removed.",
    )
    safe_private: list[SafePrivateElement] = Field(
        default_factory=list,
        description="Retain Safe Private: private elements to keep. Empty: every private element is removed.",
    )


class BlankRegion(Section):
    """A device whose burned-in text sits in known pixel rectangles: blank them instead of quarantining."""

    manufacturer: str = Field(..., description="Manufacturer (0008,0070) as written by the device (case-insensitive).")
    model: str | None = Field(None, description="ManufacturerModelName (0008,1090); None: any model.")
    rows: int | None = Field(None, ge=1, description="Only images with this many rows; None: any size.")
    columns: int | None = Field(None, ge=1, description="Only images with this many columns; None: any size.")
    regions: list[tuple[int, int, int, int]] = Field(
        ..., min_length=1, description="Rectangles [x0, y0, x1, y1] in pixels (column, row; end exclusive) to blank."
    )

    @field_validator("regions")
    @classmethod
    def _ordered(cls, value: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        for x0, y0, x1, y1 in value:
            if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError("each region is [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1")
        return value


class BurnedInConfig(Section):
    """Which images may carry burned-in text, and how to clean them."""

    modalities: list[str] = Field(
        default_factory=lambda: ["US", "OT", "XC", "ES", "GM", "SM", "DOC", "VL", "IVUS"],
        description="Modalities that commonly carry burned-in text: screened unless BurnedInAnnotation=NO "
        "(as are BurnedInAnnotation=YES images, secondary captures, ultrasound, visible light and screen saves).",
    )
    action: Literal["blank", "quarantine"] = Field(
        "blank",
        description="blank: find text with the offline text detector, blank every region found and keep the "
        "image; quarantine: quarantine every screened image instead.",
    )
    margin: int = Field(3, ge=0, le=64, description="Pixels added on every side of a detected text box before blanking.")
    blank: list[BlankRegion] = Field(
        default_factory=list,
        description="Devices whose text sits in known rectangles: these are blanked (Clean Pixel Data) without the detector.",
    )


class ExecutorConfig(Section):
    """Where the per-series tasks run: this machine's process pool, or a Dask cluster."""

    kind: Literal["local", "dask"] = Field(
        "local", description="local: a process pool of `workers` processes; dask: the workers of a Dask cluster."
    )
    address: str | None = Field(
        None,
        description="Dask scheduler, e.g. 'tcp://host:8786'. None with kind dask: a LocalCluster of `workers` "
        "worker processes on this machine.",
    )

    timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for the scheduler to answer, and for its first worker."
    )

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not _ADDRESS.match(value.strip()):
            raise ValueError("a Dask scheduler address looks like 'tcp://host:8786' (tcp, tls, ucx, ws, wss or inproc)")
        return value.strip() if value is not None else None

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "ExecutorConfig":
        if self.kind == "local" and self.address is not None:
            raise ValueError("address is a Dask scheduler: set kind: dask, or remove address")
        return self


class IngestConfig(Section):
    """How sources are read, anonymized and split."""

    workers: int | None = Field(
        None, ge=1, description="Process-pool size (or LocalCluster workers with executor kind dask); default: all cores."
    )
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    deid: DeidOptions = Field(default_factory=DeidOptions)
    burned_in: BurnedInConfig = Field(default_factory=BurnedInConfig)
    write_dicom: bool = Field(True, description="Also write the anonymized DICOM files under DATASET/dicom/.")
    audit_output: bool = Field(True, description="Scan the output for every source identifier before reporting success.")
