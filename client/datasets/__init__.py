"""Hospital-side data loaders, by dataset name."""

from __future__ import annotations

from client.datasets.hospital_data import HospitalData
from fedcare.errors import FedcareError


def load_hospital(dataset: str, partition_id: int) -> HospitalData:
    """Load the local data of the hospital with this partition id."""
    if dataset == "fed-heart-disease":
        from client.datasets.fed_heart_disease import load_center

        return load_center(partition_id)
    raise FedcareError(f"unknown dataset '{dataset}'", "choose one of: fed-heart-disease")


def num_hospitals(dataset: str) -> int:
    if dataset == "fed-heart-disease":
        from client.datasets.fed_heart_disease import CENTERS

        return len(CENTERS)
    raise FedcareError(f"unknown dataset '{dataset}'", "choose one of: fed-heart-disease")


__all__ = ["HospitalData", "load_hospital", "num_hospitals"]
