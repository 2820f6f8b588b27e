"""Lambda code assets built on this machine with pip, without Docker.

Each function's asset contains `functions/__init__.py`, `functions/common/`, the function's own
folder and the wheels of its dependencies for the Lambda platform (Python 3.12 on arm64).
pip fetches the wheels with `--platform`, so no compiler runs and the build machine's own
architecture does not matter.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling
from aws_cdk import aws_lambda as lambda_

__all__ = [
    "FUNCTION_DEPENDENCIES",
    "LOCAL_BACKEND_DEPENDENCIES",
    "PIP_PLATFORM_ARGS",
    "REPO_ROOT",
    "BundlingError",
    "FunctionBundler",
    "function_code",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_DIR = REPO_ROOT / "functions"

# Exact versions keep a deployed bundle reproducible. Raise them together with the lower
# bounds in pyproject.toml.
# simplejpeg (with numpy, which it needs) checks JPEGs whose last row is flat grey for data that
# ends early; see functions/common/imaging.py.
_IMAGE_DEPENDENCIES = (
    "aws-lambda-powertools==3.37.0",
    "pillow==13.0.0",
    "pillow-heif==1.9.0",
    "simplejpeg==1.9.0",
    "numpy==2.4.6",
)
FUNCTION_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "detect": _IMAGE_DEPENDENCIES,
    "watermark": _IMAGE_DEPENDENCIES,
    "store": ("aws-lambda-powertools==3.37.0",),
}
# Only the detect function runs the model, and only with detectorBackend=local. onnxruntime and
# numpy added about 136 MB, close to Lambda's 250 MB limit for unzipped code. numpy is now in
# every image function's bundle, because simplejpeg needs it.
LOCAL_BACKEND_DEPENDENCIES: tuple[str, ...] = ("onnxruntime==1.32.0",)

# The python3.12 Lambda runtime runs on Amazon Linux 2023 with glibc 2.34, so wheels built for
# manylinux_2_28 run there as well as manylinux2014 (glibc 2.17) ones.
PIP_PLATFORM_ARGS: tuple[str, ...] = (
    "--platform", "manylinux2014_aarch64",
    "--platform", "manylinux_2_28_aarch64",
    "--implementation", "cp",
    "--python-version", "3.12",
    "--only-binary=:all:",
)  # fmt: skip

_IGNORED_NAMES = ("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".mypy_cache")


class BundlingError(RuntimeError):
    """Building a function's asset failed."""


@jsii.implements(ILocalBundling)
class FunctionBundler:
    """Copy one function's code and install its dependencies into a CDK bundling folder."""

    def __init__(
        self,
        name: str,
        dependencies: Sequence[str],
        *,
        install_dependencies: bool,
        exclude_subfolders: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.dependencies = tuple(dependencies)
        self.install_dependencies = install_dependencies
        self.exclude_subfolders = tuple(exclude_subfolders)

    def try_bundle(self, output_dir: str, options: BundlingOptions) -> bool:
        """Fill OUTPUT_DIR with the asset, or raise BundlingError rather than use Docker."""
        output = Path(output_dir)
        if self.install_dependencies and self.dependencies:
            self._install(output)
        self._copy_code(output)
        # Returning False would make CDK try Docker, which this project does not use.
        return True

    def source_files(self) -> list[Path]:
        """Return the code files that go into the asset, sorted, as paths under REPO_ROOT."""
        roots = [FUNCTIONS_DIR / "common", FUNCTIONS_DIR / self.name]
        files = [FUNCTIONS_DIR / "__init__.py"]
        for root in roots:
            if not root.is_dir():
                raise BundlingError(
                    f"Function code folder {root} is missing. The {self.name} function "
                    "needs functions/common/ and its own folder under functions/."
                )
            files.extend(path for path in root.rglob("*") if path.is_file())
        return sorted(path for path in files if self._is_included(path))

    def asset_hash(self) -> str:
        """Return a hash of everything that decides the asset's content.

        A custom hash lets CDK reuse an earlier bundle of unchanged code instead of running
        pip on every synthesis, and it differs between a bundle with and without
        dependencies, so a test build never replaces a real one.
        """
        digest = hashlib.sha256()
        for part in (
            self.name,
            repr(self.dependencies),
            repr(PIP_PLATFORM_ARGS),
            repr(self.install_dependencies),
        ):
            digest.update(part.encode("utf-8") + b"\0")
        for path in self.source_files():
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode("utf-8") + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def _is_included(self, path: Path) -> bool:
        relative = path.relative_to(FUNCTIONS_DIR)
        if any(
            any(part == pattern or Path(part).match(pattern) for pattern in _IGNORED_NAMES)
            for part in relative.parts
        ):
            return False
        own = FUNCTIONS_DIR / self.name
        return all(own / subfolder not in path.parents for subfolder in self.exclude_subfolders)

    def _copy_code(self, output: Path) -> None:
        for path in self.source_files():
            target = output / path.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)

    def _install(self, output: Path) -> None:
        command = [
            sys.executable, "-m", "pip", "install",
            "--quiet", "--disable-pip-version-check", "--no-compile",
            *PIP_PLATFORM_ARGS,
            "--target", str(output),
            *self.dependencies,
        ]  # fmt: skip
        print(f"labelmark: installing {self.name} dependencies: {' '.join(self.dependencies)}")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BundlingError(
                f"pip failed with exit code {result.returncode} while installing the "
                f"{self.name} function's dependencies ({' '.join(self.dependencies)}). "
                f"pip output:\n{result.stderr.strip() or result.stdout.strip()}\n"
                "Check the network access to PyPI, or synthesize with "
                "-c labelmark:bundle=false for a stack that cannot be deployed."
            )


def function_code(bundler: FunctionBundler) -> lambda_.Code:
    """Return the Lambda code asset that BUNDLER builds."""
    return lambda_.Code.from_asset(
        str(FUNCTIONS_DIR),
        asset_hash=bundler.asset_hash(),
        asset_hash_type=AssetHashType.CUSTOM,
        bundling=BundlingOptions(
            # CDK requires an image, but try_bundle() returns True or raises, so CDK never
            # pulls it.
            image=DockerImage.from_registry("public.ecr.aws/sam/build-python3.12"),
            # jsii matches ILocalBundling by the try_bundle method at run time; its Python stub
            # declares the options as keyword arguments, which mypy cannot match.
            local=bundler,  # type: ignore[arg-type]
        ),
    )
