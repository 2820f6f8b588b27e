"""CDK app entry point of labelmark.

Run `cdk synth` from infra/ (cdk.json calls `python app.py`), or `python -m infra.app` from the
repository root. Both need the project's virtual environment active.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # `python app.py` from infra/ puts infra/ on the path, but the stack imports `infra.*`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aws_cdk import App, Environment, Validations
from cdk_nag import AwsSolutionsChecks

from infra.nag import suppress_reviewed_findings
from infra.stack import LabelmarkStack

__all__ = ["STACK_NAME", "create_app", "main"]

STACK_NAME = "Labelmark"
CDK_JSON = Path(__file__).resolve().parent / "cdk.json"


def create_app(
    context: dict[str, Any] | None = None, outdir: str | None = None
) -> tuple[App, LabelmarkStack]:
    """Build the app with its stack and cdk-nag checks; CONTEXT adds or overrides context keys.

    The feature flags from cdk.json are the base context, so a test that builds the app in
    Python synthesizes the same template as the CDK CLI. Context from the CLI overrides both.
    """
    base_context = json.loads(CDK_JSON.read_text("utf-8")).get("context", {})
    app = App(context={**base_context, **(context or {})}, outdir=outdir)

    # Without an account and region the stack is environment-agnostic, which lets `cdk synth`
    # run with no AWS credentials.
    environment = Environment(
        account=os.environ.get("CDK_DEFAULT_ACCOUNT"),
        region=os.environ.get("CDK_DEFAULT_REGION"),
    )
    stack = LabelmarkStack(app, STACK_NAME, env=environment)

    suppress_reviewed_findings(stack)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    return app, stack


def main() -> None:
    """Synthesize the app into the CDK output folder."""
    app, _ = create_app()
    app.synth()


if __name__ == "__main__":
    main()
