"""Tests of the CDK app in infra/: the synthesized template, cdk-nag findings and the CLI.

Synthesis runs with `labelmark:bundle=false`, so the function assets hold the code but no pip
dependencies, and no test reaches PyPI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import aws_iam as iam
from aws_cdk.assertions import Template

from functions.watermark.settings import PILLOW_ENVIRONMENT
from infra.app import create_app
from infra.definitions import (
    BACKFILL_FILE,
    BACKFILL_PLACEHOLDERS,
    WORKFLOW_FILE,
    WORKFLOW_PLACEHOLDERS,
    DefinitionError,
    definition_body,
)
from infra.settings import SettingsError
from infra.stack import FUNCTION_SIZING

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA_DIR = REPO_ROOT / "infra"
CDK_CLI = INFRA_DIR / "node_modules" / ".bin" / "cdk"

OFFLINE_CONTEXT = {"labelmark:bundle": "false", "@aws-cdk/core:validationReportJson": True}

# Step Functions ends an EXPRESS execution after 5 minutes.
EXPRESS_MAX_SECONDS = 300
EXECUTIONS = "arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}:execution:"
SYNC_EVENTS_RULE = (
    "arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:rule/"
    "StepFunctionsGetEventsForStepFunctionsExecutionRule"
)
# What CDK grants a state machine for log delivery and X-Ray. None of these actions supports
# resource-level permissions.
LOGS_AND_XRAY_ACTIONS = [
    "logs:CreateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:DescribeLogGroups",
    "logs:DescribeResourcePolicies",
    "logs:GetLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:UpdateLogDelivery",
    "xray:GetSamplingRules",
    "xray:GetSamplingTargets",
    "xray:PutTelemetryRecords",
    "xray:PutTraceSegments",
]

# Environment for the CDK CLI: no version check, telemetry or notices, and no AWS SDK lookup of
# the EC2 instance metadata service, so synthesis sends nothing over the network.
CLI_ENVIRONMENT = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "CDK_DISABLE_VERSION_CHECK": "1",
    "CDK_DISABLE_CLI_TELEMETRY": "true",
}


class Synthesized:
    """A synthesized app: its stack, template and output folder."""

    def __init__(self, context: dict[str, Any], outdir: Path) -> None:
        self.app, self.stack = create_app({**OFFLINE_CONTEXT, **context}, outdir=str(outdir))
        self.outdir = outdir
        self.template = Template.from_stack(self.stack)
        self.resources: dict[str, Any] = self.template.to_json()["Resources"]

    def logical_id(self, construct: Any) -> str:
        return str(self.stack.resolve(self.stack.get_logical_id(construct.node.default_child)))

    def properties(self, construct: Any) -> dict[str, Any]:
        return self.resources[self.logical_id(construct)]["Properties"]

    def permissions(self, role: iam.IRole | None) -> set[tuple[str, str]]:
        """Return every (action, resource) pair that the policies attached to ROLE allow."""
        assert role is not None, "the construct has no IAM role"
        role_id = self.logical_id(role)
        pairs: set[tuple[str, str]] = set()
        for resource in self.resources.values():
            if resource["Type"] != "AWS::IAM::Policy":
                continue
            if {"Ref": role_id} not in resource["Properties"].get("Roles", []):
                continue
            pairs |= statement_pairs(resource["Properties"]["PolicyDocument"])
        return pairs

    def asset_files(self, function: Any) -> set[str]:
        key = self.properties(function)["Code"]["S3Key"]
        asset_dir = self.outdir / f"asset.{key.removesuffix('.zip')}"
        return {
            path.relative_to(asset_dir).as_posix()
            for path in asset_dir.rglob("*")
            if path.is_file()
        }


def render(value: Any) -> str:
    """Render an intrinsic function as text: Ref X is ${X}, GetAtt X.Arn is ${X.Arn}."""
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return f"${{{value['Ref']}}}"
    if "Fn::GetAtt" in value:
        logical_id, attribute = value["Fn::GetAtt"]
        return f"${{{logical_id}.{attribute}}}"
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(render(part) for part in parts)
    raise AssertionError(f"Unexpected intrinsic in a policy or definition: {value!r}")


def statement_pairs(document: dict[str, Any]) -> set[tuple[str, str]]:
    """Return the (action, resource) pairs of a policy document's Allow statements."""
    pairs: set[tuple[str, str]] = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow", statement
        actions = statement["Action"]
        resources = statement["Resource"]
        for action in actions if isinstance(actions, list) else [actions]:
            for resource in resources if isinstance(resources, list) else [resources]:
                pairs.add((action, render(resource)))
    return pairs


def product(actions: list[str], resources: list[str]) -> set[tuple[str, str]]:
    return {(action, resource) for action in actions for resource in resources}


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return Synthesized({}, tmp_path_factory.mktemp("cdk-default"))


@pytest.fixture(scope="module")
def express(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return Synthesized({"workflowType": "EXPRESS"}, tmp_path_factory.mktemp("cdk-express"))


def nag_findings(synthesized: Synthesized) -> list[str]:
    """Synthesize the app and return its unacknowledged cdk-nag findings."""
    synthesized.app.synth()
    report = json.loads((synthesized.outdir / "policy-validation-report.json").read_text())
    return [
        f"{violation['severity']} {violation['ruleName']} at {resource['constructPath']}"
        for plugin in report["pluginReports"]
        for violation in plugin["violations"]
        for resource in violation["violatingResources"]
    ]


def substitute(text: str, substitutions: dict[str, Any]) -> Any:
    """Replace each ${Name} in TEXT with its rendered value, as CloudFormation would, and parse."""
    for name, value in substitutions.items():
        text = text.replace(f"${{{name}}}", render(value))
    return json.loads(text)


# Trigger


def test_trigger_rule_event_pattern_exact(synthesized: Synthesized) -> None:
    rule = synthesized.properties(synthesized.stack.trigger_rule)
    source_id = synthesized.logical_id(synthesized.stack.source_bucket)

    assert rule["EventPattern"] == {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {"bucket": {"name": [{"Ref": source_id}]}},
    }
    assert rule["State"] == "ENABLED"


def test_trigger_target_dead_letter_and_retry(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    (target,) = synthesized.properties(stack.trigger_rule)["Targets"]

    assert target["Arn"] == {"Ref": synthesized.logical_id(stack.state_machine)}
    assert target["DeadLetterConfig"] == {
        "Arn": {"Fn::GetAtt": [synthesized.logical_id(stack.dead_letter_queue), "Arn"]}
    }
    assert target["RetryPolicy"] == {"MaximumEventAgeInSeconds": 21600, "MaximumRetryAttempts": 50}


def test_dead_letter_queue_encrypted_and_tls_only(synthesized: Synthesized) -> None:
    queue = synthesized.stack.dead_letter_queue
    queue_id = synthesized.logical_id(queue)

    assert synthesized.properties(queue)["SqsManagedSseEnabled"] is True
    policies = [
        resource["Properties"]["PolicyDocument"]["Statement"]
        for resource in synthesized.resources.values()
        if resource["Type"] == "AWS::SQS::QueuePolicy"
        and {"Ref": queue_id} in resource["Properties"]["Queues"]
    ]
    statements = [statement for document in policies for statement in document]
    assert any(
        statement["Effect"] == "Deny"
        and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        for statement in statements
    )
    # EventBridge may send only for this rule.
    assert any(
        statement["Effect"] == "Allow"
        and statement["Principal"] == {"Service": "events.amazonaws.com"}
        and statement["Action"] == "sqs:SendMessage"
        and statement["Condition"]["ArnEquals"]["aws:SourceArn"]
        == {"Fn::GetAtt": [synthesized.logical_id(synthesized.stack.trigger_rule), "Arn"]}
        for statement in statements
    )


# Buckets


def test_buckets_block_public_access_and_encrypt(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    for bucket in (stack.source_bucket, stack.processed_bucket, stack.access_log_bucket):
        properties = synthesized.properties(bucket)
        assert properties["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }, bucket.node.path
        assert properties["BucketEncryption"] == {
            "ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
            ]
        }, bucket.node.path


def test_buckets_policy_denies_insecure_transport(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    for bucket in (stack.source_bucket, stack.processed_bucket, stack.access_log_bucket):
        bucket_id = synthesized.logical_id(bucket)
        (policy,) = [
            resource["Properties"]
            for resource in synthesized.resources.values()
            if resource["Type"] == "AWS::S3::BucketPolicy"
            and resource["Properties"]["Bucket"] == {"Ref": bucket_id}
        ]
        denials = [
            statement
            for statement in policy["PolicyDocument"]["Statement"]
            if statement["Effect"] == "Deny"
        ]
        assert denials, bucket.node.path
        (denial,) = denials
        assert denial["Action"] == "s3:*"
        assert denial["Principal"] == {"AWS": "*"}
        assert denial["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        assert {render(resource) for resource in denial["Resource"]} == {
            f"${{{bucket_id}.Arn}}",
            f"${{{bucket_id}.Arn}}/*",
        }


def test_source_bucket_sends_events_and_logs_access(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    source = synthesized.properties(stack.source_bucket)

    assert source["NotificationConfiguration"] == {
        "EventBridgeConfiguration": {"EventBridgeEnabled": True}
    }
    assert source["VersioningConfiguration"] == {"Status": "Enabled"}
    assert source["LoggingConfiguration"]["DestinationBucketName"] == {
        "Ref": synthesized.logical_id(stack.access_log_bucket)
    }
    # The processed bucket must never start the pipeline.
    assert "NotificationConfiguration" not in synthesized.properties(stack.processed_bucket)


def test_processed_bucket_expires_staging(synthesized: Synthesized) -> None:
    rules = synthesized.properties(synthesized.stack.processed_bucket)["LifecycleConfiguration"][
        "Rules"
    ]
    (staging,) = [rule for rule in rules if rule.get("Prefix") == "labelmark-staging/"]

    assert staging["Status"] == "Enabled"
    assert staging["ExpirationInDays"] == 1
    assert staging["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_bucket_names_generated_by_default(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    assert "BucketName" not in synthesized.properties(stack.source_bucket)
    assert "BucketName" not in synthesized.properties(stack.processed_bucket)


def test_bucket_names_from_context(tmp_path: Path) -> None:
    named = Synthesized(
        {
            "sourceBucketName": "my-source-images-app",
            "processedBucketName": "my-processed-images-app",
        },
        tmp_path,
    )
    assert named.properties(named.stack.source_bucket)["BucketName"] == "my-source-images-app"
    processed = named.properties(named.stack.processed_bucket)
    assert processed["BucketName"] == "my-processed-images-app"
    detect = named.properties(named.stack.detect_function)
    assert detect["Environment"]["Variables"]["PROCESSED_BUCKET"] == {
        "Ref": named.logical_id(named.stack.processed_bucket)
    }


# Settings that must be rejected


def test_settings_same_bucket_rejected() -> None:
    with pytest.raises(
        SettingsError,
        match=r"sourceBucketName 'my-images-app' and processedBucketName 'my-images-app' "
        r"are the same bucket",
    ):
        create_app(
            {
                **OFFLINE_CONTEXT,
                "sourceBucketName": "my-images-app",
                "processedBucketName": "my-images-app",
            }
        )


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"outputPrefix": ""}, r"outputPrefix is empty"),
        ({"outputPrefix": "labelmark-staging/out-"}, r"overlaps the pipeline's own prefix"),
        ({"outputPrefix": "labelmark-"}, r"overlaps the pipeline's own prefix"),
        ({"outputPrefix": "wm-*"}, r"contains '\*'"),
        ({"sourceBucketName": "Bad_Name"}, r"sourceBucketName 'Bad_Name' is not a valid"),
        ({"detectorBackend": "gpu"}, r"detectorBackend 'gpu' is invalid"),
        ({"workflowType": "FAST"}, r"workflowType 'FAST' is invalid"),
        # EXPRESS keeps no execution history outside the log group.
        (
            {"workflowType": "EXPRESS", "workflowLogLevel": "ERROR"},
            r"workflowLogLevel 'ERROR' with workflowType 'EXPRESS'.*Use workflowLogLevel=ALL",
        ),
        ({"outputPrefix": "labelmark-backfill/x-"}, r"overlaps the pipeline's own prefix"),
        ({"maxLabels": "many"}, r"maxLabels must be a whole number"),
        ({"detectReservedConcurrency": 0}, r"detectReservedConcurrency must be at least 1"),
    ],
)
def test_settings_invalid_value_rejected(context: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        create_app({**OFFLINE_CONTEXT, **context})


# Functions


def test_functions_runtime_architecture_tracing(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    expected = {
        stack.detect_function: ("functions.detect.handler.handler", 1024, 20),
        stack.watermark_function: ("functions.watermark.handler.handler", 1769, 30),
        stack.store_function: ("functions.store.handler.handler", 256, 10),
    }
    for function, (handler, memory, timeout) in expected.items():
        properties = synthesized.properties(function)
        assert properties["Runtime"] == "python3.12", handler
        assert properties["Architectures"] == ["arm64"], handler
        assert properties["TracingConfig"] == {"Mode": "Active"}, handler
        assert properties["Handler"] == handler
        assert properties["MemorySize"] == memory, handler
        assert properties["Timeout"] == timeout, handler


def test_functions_environment_defaults(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    processed_ref = {"Ref": synthesized.logical_id(stack.processed_bucket)}
    for function in (stack.detect_function, stack.watermark_function, stack.store_function):
        variables = synthesized.properties(function)["Environment"]["Variables"]
        only_watermark = PILLOW_ENVIRONMENT if function is stack.watermark_function else {}
        assert variables == {
            **only_watermark,
            "PROCESSED_BUCKET": processed_ref,
            "OUTPUT_PREFIX": "watermarked-",
            "DETECTOR_BACKEND": "rekognition",
            "MAX_LABELS": "10",
            "MIN_CONFIDENCE": "70",
            "EXCLUDED_LABELS": "",
            "MAX_PIXELS": "100000000",
            "POWERTOOLS_SERVICE_NAME": "labelmark",
            "POWERTOOLS_METRICS_NAMESPACE": "labelmark",
            "LOG_LEVEL": "INFO",
        }, function.node.path


def test_watermark_environment_keeps_freed_image_memory_in_pillow() -> None:
    # Pillow reads PILLOW_BLOCKS_MAX when PIL.Image is imported, and it would ignore a renamed
    # variable without a word. So a child process checks that the value takes effect.
    script = "from PIL import Image\nprint(Image.core.get_blocks_max())"
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **PILLOW_ENVIRONMENT},
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(result.stdout) == int(PILLOW_ENVIRONMENT["PILLOW_BLOCKS_MAX"]) > 0


def test_detect_reserved_concurrency_default(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    assert synthesized.properties(stack.detect_function)["ReservedConcurrentExecutions"] == 10
    assert "ReservedConcurrentExecutions" not in synthesized.properties(stack.store_function)


@pytest.mark.parametrize(
    ("name", "other_functions"),
    [
        ("detect", ("watermark", "store")),
        ("watermark", ("detect", "store")),
        ("store", ("detect", "watermark")),
    ],
)
def test_function_asset_own_code_only(
    synthesized: Synthesized, name: str, other_functions: tuple[str, ...]
) -> None:
    function = getattr(synthesized.stack, f"{name}_function")
    files = synthesized.asset_files(function)

    assert "functions/__init__.py" in files
    assert any(path.startswith("functions/common/") for path in files)
    assert any(path.startswith(f"functions/{name}/") for path in files)
    for path in files:
        assert path == "functions/__init__.py" or path.startswith(
            ("functions/common/", f"functions/{name}/")
        ), path
        assert "__pycache__" not in path, path
    for other in other_functions:
        assert not any(path.startswith(f"functions/{other}/") for path in files), other


def test_detect_asset_excludes_model_for_rekognition(synthesized: Synthesized) -> None:
    files = synthesized.asset_files(synthesized.stack.detect_function)
    assert not any(path.startswith("functions/detect/model/") for path in files)


# IAM


def test_detect_role_permissions_exact(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    source = synthesized.logical_id(stack.source_bucket)
    log_group = synthesized.logical_id(stack.detect_function.log_group)
    permissions = synthesized.permissions(stack.detect_function.role)

    assert permissions == (
        product(["logs:CreateLogStream", "logs:PutLogEvents"], [f"${{{log_group}.Arn}}"])
        | product(
            ["rekognition:DetectLabels", "xray:PutTraceSegments", "xray:PutTelemetryRecords"],
            ["*"],
        )
        | product(
            ["s3:GetObject*", "s3:GetBucket*", "s3:List*"],
            [f"${{{source}.Arn}}", f"${{{source}.Arn}}/*"],
        )
    )
    assert not any(action.startswith("s3:Put") for action, _ in permissions)


def test_watermark_role_permissions_exact(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    source = synthesized.logical_id(stack.source_bucket)
    processed = synthesized.logical_id(stack.processed_bucket)
    log_group = synthesized.logical_id(stack.watermark_function.log_group)
    permissions = synthesized.permissions(stack.watermark_function.role)

    assert permissions == (
        product(["logs:CreateLogStream", "logs:PutLogEvents"], [f"${{{log_group}.Arn}}"])
        | product(["xray:PutTraceSegments", "xray:PutTelemetryRecords"], ["*"])
        | product(
            ["s3:GetObject*", "s3:GetBucket*", "s3:List*"],
            [f"${{{source}.Arn}}", f"${{{source}.Arn}}/*"],
        )
        | product(
            [
                "s3:Abort*",
                "s3:PutObject",
                "s3:PutObjectLegalHold",
                "s3:PutObjectRetention",
                "s3:PutObjectTagging",
                "s3:PutObjectVersionTagging",
            ],
            [f"${{{processed}.Arn}}/labelmark-staging/*"],
        )
    )
    assert not any(action.startswith("s3:Delete") for action, _ in permissions)


def test_store_role_permissions_exact(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    source = synthesized.logical_id(stack.source_bucket)
    processed = synthesized.logical_id(stack.processed_bucket)
    log_group = synthesized.logical_id(stack.store_function.log_group)
    permissions = synthesized.permissions(stack.store_function.role)
    staging = f"${{{processed}.Arn}}/labelmark-staging/*"
    failures = f"${{{processed}.Arn}}/labelmark-failures/*"

    assert permissions == (
        product(["logs:CreateLogStream", "logs:PutLogEvents"], [f"${{{log_group}.Arn}}"])
        | product(["xray:PutTraceSegments", "xray:PutTelemetryRecords"], ["*"])
        | product(
            ["s3:GetObject*", "s3:GetBucket*", "s3:List*"],
            [f"${{{processed}.Arn}}", staging, f"${{{processed}.Arn}}/watermarked-*"],
        )
        | {("s3:DeleteObject*", staging), ("s3:DeleteObject*", failures)}
        | product(
            [
                "s3:Abort*",
                "s3:PutObject",
                "s3:PutObjectLegalHold",
                "s3:PutObjectRetention",
                "s3:PutObjectTagging",
                "s3:PutObjectVersionTagging",
            ],
            [f"${{{processed}.Arn}}/watermarked-*"],
        )
    )
    assert not any(source in resource for _, resource in permissions)


def test_state_machine_role_permissions_exact(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    processed = synthesized.logical_id(stack.processed_bucket)
    functions = [
        synthesized.logical_id(function)
        for function in (stack.detect_function, stack.watermark_function, stack.store_function)
    ]
    permissions = synthesized.permissions(stack.state_machine.role)

    invoked = {resource for action, resource in permissions if action == "lambda:InvokeFunction"}
    assert invoked == {f"${{{fn}.Arn}}" for fn in functions} | {
        f"${{{fn}.Arn}}:*" for fn in functions
    }
    s3_pairs = {pair for pair in permissions if pair[0].startswith("s3:")}
    assert s3_pairs == {("s3:PutObject", f"${{{processed}.Arn}}/labelmark-failures/*")}
    # Everything else is log delivery and X-Ray, which support no resource-level permissions.
    rest = permissions - s3_pairs - {pair for pair in permissions if pair[0].startswith("lambda:")}
    assert {resource for _, resource in rest} == {"*"}
    assert {action.split(":")[0] for action, _ in rest} == {"logs", "xray"}


def test_operator_policy_standard_redrive_scope(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    machine = synthesized.logical_id(stack.state_machine)
    backfill = synthesized.logical_id(stack.backfill_state_machine)
    document = synthesized.properties(stack.operator_policy)["PolicyDocument"]
    inspect = ["states:RedriveExecution", "states:DescribeExecution", "states:GetExecutionHistory"]

    assert statement_pairs(document) == (
        product(["states:StartExecution", "states:ListExecutions"], [f"${{{machine}}}"])
        | product(inspect, [f"{EXECUTIONS}${{{machine}.Name}}:*"])
        | product(["states:StartExecution", "states:ListExecutions"], [f"${{{backfill}}}"])
        | product(inspect, [f"{EXECUTIONS}${{{backfill}.Name}}:*"])
    )


def test_operator_policy_express_no_redrive(express: Synthesized) -> None:
    stack = express.stack
    machine = express.logical_id(stack.state_machine)
    backfill = express.logical_id(stack.backfill_state_machine)
    log_group = express.logical_id(stack.workflow_log_group)
    permissions = statement_pairs(express.properties(stack.operator_policy)["PolicyDocument"])

    # EXPRESS executions have no redrive and no history API, so operators read the log group.
    pipeline_pairs = {pair for pair in permissions if backfill not in pair[1]}
    assert pipeline_pairs == {("states:StartExecution", f"${{{machine}}}")} | product(
        ["logs:DescribeLogStreams", "logs:FilterLogEvents", "logs:GetLogEvents"],
        [f"${{{log_group}.Arn}}"],
    )
    assert not any(action == "states:RedriveExecution" for action, _ in pipeline_pairs)
    # The backfill is STANDARD in both cases, so its redrive stays.
    assert ("states:RedriveExecution", f"{EXECUTIONS}${{{backfill}.Name}}:*") in permissions


def test_backfill_role_permissions_exact(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    source = synthesized.logical_id(stack.source_bucket)
    processed = synthesized.logical_id(stack.processed_bucket)
    pipeline = synthesized.logical_id(stack.state_machine)
    backfill = synthesized.logical_id(stack.backfill_state_machine)
    permissions = synthesized.permissions(stack.backfill_state_machine.role)
    follow = ["states:DescribeExecution", "states:StopExecution"]

    assert permissions == (
        product(LOGS_AND_XRAY_ACTIONS, ["*"])
        # ItemReader: ListObjectsV2 over the prefix from the execution input.
        | {("s3:ListBucket", f"${{{source}.Arn}}")}
        # RunPipeline: states:startExecution.sync:2 on the pipeline.
        | {("states:StartExecution", f"${{{pipeline}}}")}
        | product(follow, [f"{EXECUTIONS}${{{pipeline}.Name}}:*"])
        | product(
            ["events:PutTargets", "events:PutRule", "events:DescribeRule"], [SYNC_EVENTS_RULE]
        )
        # The Distributed Map's child executions of the backfill state machine itself.
        | {("states:StartExecution", f"${{{backfill}}}")}
        | product(
            follow,
            [f"{EXECUTIONS}${{{backfill}.Name}}:*", f"{EXECUTIONS}${{{backfill}.Name}}/Backfill:*"],
        )
        # ResultWriter: the Map Run's manifest and results.
        | product(
            [
                "s3:PutObject",
                "s3:GetObject",
                "s3:ListMultipartUploadParts",
                "s3:AbortMultipartUpload",
            ],
            [f"${{{processed}.Arn}}/labelmark-backfill/*"],
        )
    )
    assert not any(action.startswith("lambda:") for action, _ in permissions)
    assert not any(
        action == "s3:GetObject" and source in resource for action, resource in permissions
    )


# State machine


def test_state_machine_definition_from_workflow_file(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    properties = synthesized.properties(stack.state_machine)
    file_text = WORKFLOW_FILE.read_text("utf-8")
    substitutions = properties["DefinitionSubstitutions"]

    assert set(re.findall(r"\$\{(\w+)\}", file_text)) == set(WORKFLOW_PLACEHOLDERS)
    assert substitutions == {
        "DetectFunctionArn": {"Fn::GetAtt": [synthesized.logical_id(stack.detect_function), "Arn"]},
        "WatermarkFunctionArn": {
            "Fn::GetAtt": [synthesized.logical_id(stack.watermark_function), "Arn"]
        },
        "StoreFunctionArn": {"Fn::GetAtt": [synthesized.logical_id(stack.store_function), "Arn"]},
        "ProcessedBucket": {"Ref": synthesized.logical_id(stack.processed_bucket)},
        "OutputPrefix": "watermarked-",
    }

    # Substitute the same rendered values into both texts and compare the parsed documents.
    # CDK re-serializes the JSON, so whitespace differs.
    definition = properties["DefinitionString"]
    assert isinstance(definition, str), "the definition must contain no CloudFormation tokens"
    assert substitute(definition, substitutions) == substitute(file_text, substitutions)


def test_state_machine_standard_traced_logged(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    properties = synthesized.properties(stack.state_machine)

    assert properties["StateMachineType"] == "STANDARD"
    assert properties["TracingConfiguration"] == {"Enabled": True}
    logging = properties["LoggingConfiguration"]
    assert logging["Level"] == "ALL"
    assert logging["IncludeExecutionData"] is False
    assert logging["Destinations"] == [
        {
            "CloudWatchLogsLogGroup": {
                "LogGroupArn": {
                    "Fn::GetAtt": [synthesized.logical_id(stack.workflow_log_group), "Arn"]
                }
            }
        }
    ]


def test_state_machine_express_traced_logged_all(express: Synthesized) -> None:
    stack = express.stack
    properties = express.properties(stack.state_machine)

    assert properties["StateMachineType"] == "EXPRESS"
    assert properties["TracingConfiguration"] == {"Enabled": True}
    # The log group is an EXPRESS execution's only history, so every transition is logged.
    logging = properties["LoggingConfiguration"]
    assert logging["Level"] == "ALL"
    assert logging["IncludeExecutionData"] is False
    assert logging["Destinations"] == [
        {
            "CloudWatchLogsLogGroup": {
                "LogGroupArn": {"Fn::GetAtt": [express.logical_id(stack.workflow_log_group), "Arn"]}
            }
        }
    ]
    # A Distributed Map needs a STANDARD parent, whatever the pipeline's type.
    assert express.properties(stack.backfill_state_machine)["StateMachineType"] == "STANDARD"


def test_pipeline_worst_case_fits_express_limit() -> None:
    states = json.loads(WORKFLOW_FILE.read_text("utf-8"))["States"]
    function_states = {
        name: state["Parameters"]["FunctionName"]
        for name, state in states.items()
        if state.get("Resource") == "arn:aws:states:::lambda:invoke"
    }
    assert sorted(function_states.values()) == sorted(
        f"${{{name.capitalize()}FunctionArn}}" for name in FUNCTION_SIZING
    )

    # Every stage succeeds on its last attempt after all its timeout retries, and then
    # RecordFailure uses all of its retries. Waits are at their maximum, without jitter.
    worst = 0.0
    for name, placeholder in function_states.items():
        function = placeholder.removeprefix("${").removesuffix("FunctionArn}").lower()
        timeout = FUNCTION_SIZING[function].timeout_seconds
        retrier = timeout_retrier(states[name])
        worst += (retrier["MaxAttempts"] + 1) * timeout + retry_waits(retrier)
    (record_retrier,) = states["RecordFailure"]["Retry"]
    worst += retry_waits(record_retrier)

    assert worst <= EXPRESS_MAX_SECONDS
    # The comment next to FUNCTION_SIZING in infra/stack.py states this figure.
    assert worst == 268


def timeout_retrier(state: dict[str, Any]) -> dict[str, Any]:
    (retrier,) = [
        retrier for retrier in state["Retry"] if "Sandbox.Timedout" in retrier["ErrorEquals"]
    ]
    assert "States.Timeout" in retrier["ErrorEquals"]
    return retrier


def retry_waits(retrier: dict[str, Any]) -> float:
    """Return the longest total wait of RETRIER's retries, using the States Language defaults."""
    interval = retrier.get("IntervalSeconds", 1)
    backoff = retrier.get("BackoffRate", 2.0)
    cap = retrier.get("MaxDelaySeconds", float("inf"))
    return sum(
        min(interval * backoff**attempt, cap) for attempt in range(retrier.get("MaxAttempts", 3))
    )


# Backfill


def test_backfill_definition_from_file(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    properties = synthesized.properties(stack.backfill_state_machine)
    file_text = BACKFILL_FILE.read_text("utf-8")
    substitutions = properties["DefinitionSubstitutions"]

    assert set(re.findall(r"\$\{(\w+)\}", file_text)) == set(BACKFILL_PLACEHOLDERS)
    assert substitutions == {
        "SourceBucket": {"Ref": synthesized.logical_id(stack.source_bucket)},
        "ProcessedBucket": {"Ref": synthesized.logical_id(stack.processed_bucket)},
        "PipelineStateMachineArn": {"Ref": synthesized.logical_id(stack.state_machine)},
    }
    definition = properties["DefinitionString"]
    assert isinstance(definition, str), "the definition must contain no CloudFormation tokens"
    assert substitute(definition, substitutions) == substitute(file_text, substitutions)


def test_backfill_standard_traced_logged(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    properties = synthesized.properties(stack.backfill_state_machine)
    log_group = stack.backfill.log_group

    assert properties["StateMachineType"] == "STANDARD"
    assert properties["TracingConfiguration"] == {"Enabled": True}
    logging = properties["LoggingConfiguration"]
    assert logging["Level"] == "ALL"
    assert logging["IncludeExecutionData"] is False
    assert logging["Destinations"] == [
        {
            "CloudWatchLogsLogGroup": {
                "LogGroupArn": {"Fn::GetAtt": [synthesized.logical_id(log_group), "Arn"]}
            }
        }
    ]
    assert synthesized.properties(log_group)["LogGroupName"] == (
        "/aws/vendedlogs/states/Labelmark-backfill"
    )


def test_definition_body_placeholder_mismatch_rejected() -> None:
    values = dict.fromkeys(BACKFILL_PLACEHOLDERS, "x")
    with pytest.raises(DefinitionError, match=r"uses the placeholders .* Make the two lists equal"):
        definition_body(BACKFILL_FILE, {**values, "Unused": "x"})
    del values["SourceBucket"]
    with pytest.raises(
        DefinitionError, match=r"substitutes \['PipelineStateMachineArn', 'ProcessedBucket'\]"
    ):
        definition_body(BACKFILL_FILE, values)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # A placeholder that the stack does not substitute.
        (
            lambda text: text.replace('"Label": "Backfill"', '"Label": "${MapLabel}"'),
            r"uses the placeholders \['MapLabel', ",
        ),
        # Child execution ARNs contain the label, so the grants need it.
        (lambda text: text.replace('"Label": "Backfill",', ""), r"has no Label"),
        # The ResultWriter grant covers labelmark-backfill/ only.
        (
            lambda text: text.replace('"Prefix": "labelmark-backfill"', '"Prefix": "results"'),
            r"writes under 'results'",
        ),
    ],
)
def test_backfill_file_mismatch_rejected(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: Any,
    message: str,
) -> None:
    edited = tmp_path / "backfill.asl.json"
    edited.write_text(edit(BACKFILL_FILE.read_text("utf-8")), "utf-8")
    assert edited.read_text("utf-8") != BACKFILL_FILE.read_text("utf-8")
    monkeypatch.setattr("infra.backfill.BACKFILL_FILE", edited)

    with pytest.raises(DefinitionError, match=message):
        create_app(OFFLINE_CONTEXT, outdir=str(tmp_path / "cdk.out"))


def test_detect_local_backend_drops_rekognition(tmp_path: Path) -> None:
    local = Synthesized({"detectorBackend": "local"}, tmp_path)
    detect = local.stack.detect_function

    variables = local.properties(detect)["Environment"]["Variables"]
    assert variables["DETECTOR_BACKEND"] == "local"
    assert not any(
        action.startswith("rekognition:") for action, _ in local.permissions(detect.role)
    )


# Operations


def test_alarms_notify_topic(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    topic = {"Ref": synthesized.logical_id(stack.alarm_topic)}

    failed = synthesized.properties(stack.failed_executions_alarm)
    assert failed["Namespace"] == "AWS/States"
    assert failed["MetricName"] == "ExecutionsFailed"
    assert failed["Dimensions"] == [
        {"Name": "StateMachineArn", "Value": {"Ref": synthesized.logical_id(stack.state_machine)}}
    ]
    assert failed["Threshold"] == 1
    assert failed["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert failed["AlarmActions"] == [topic]

    dead_letter = synthesized.properties(stack.dead_letter_alarm)
    assert dead_letter["Namespace"] == "AWS/SQS"
    assert dead_letter["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert dead_letter["Dimensions"] == [
        {
            "Name": "QueueName",
            "Value": {"Fn::GetAtt": [synthesized.logical_id(stack.dead_letter_queue), "QueueName"]},
        }
    ]
    assert dead_letter["Threshold"] == 1
    assert dead_letter["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert dead_letter["AlarmActions"] == [topic]


def test_alarm_topic_encrypted_for_cloudwatch(synthesized: Synthesized) -> None:
    stack = synthesized.stack
    key_id = synthesized.logical_id(stack.alarm_key)

    assert synthesized.properties(stack.alarm_topic)["KmsMasterKeyId"] == {
        "Fn::GetAtt": [key_id, "Arn"]
    }
    key = synthesized.properties(stack.alarm_key)
    assert key["EnableKeyRotation"] is True
    assert any(
        statement.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
        and set(statement["Action"]) == {"kms:Decrypt", "kms:GenerateDataKey*"}
        for statement in key["KeyPolicy"]["Statement"]
    )


def test_outputs_names_arn_console_url(synthesized: Synthesized) -> None:
    outputs = synthesized.template.to_json()["Outputs"]
    machine = synthesized.logical_id(synthesized.stack.state_machine)

    assert outputs["SourceBucketName"]["Value"] == {
        "Ref": synthesized.logical_id(synthesized.stack.source_bucket)
    }
    assert outputs["ProcessedBucketName"]["Value"] == {
        "Ref": synthesized.logical_id(synthesized.stack.processed_bucket)
    }
    assert outputs["StateMachineArn"]["Value"] == {"Ref": machine}
    assert outputs["BackfillStateMachineArn"]["Value"] == {
        "Ref": synthesized.logical_id(synthesized.stack.backfill_state_machine)
    }
    assert render(outputs["ExecutionsConsoleUrl"]["Value"]) == (
        "https://${AWS::Region}.console.aws.amazon.com/states/home?region=${AWS::Region}"
        f"#/statemachines/view/${{{machine}}}"
    )


# cdk-nag


def test_nag_no_unacknowledged_findings(synthesized: Synthesized) -> None:
    assert nag_findings(synthesized) == []


def test_nag_express_no_unacknowledged_findings(express: Synthesized) -> None:
    assert nag_findings(express) == []


def test_nag_new_wildcard_fails_synthesis(tmp_path: Path) -> None:
    app, stack = create_app(OFFLINE_CONTEXT, outdir=str(tmp_path))
    stack.store_function.add_to_role_policy(iam.PolicyStatement(actions=["s3:*"], resources=["*"]))
    with pytest.raises(
        RuntimeError, match=r"(?s)ValidationFailed.*AwsSolutions-IAM5\[Action::s3:\*\]"
    ):
        app.synth()
    report = json.loads((tmp_path / "policy-validation-report.json").read_text())
    rules = {
        violation["ruleName"]
        for plugin in report["pluginReports"]
        for violation in plugin["violations"]
    }
    assert "AwsSolutions-IAM5[Action::s3:*]" in rules


# CDK CLI


def test_cdk_cli_synth_offline(tmp_path: Path) -> None:
    if not CDK_CLI.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CDK_CLI} is missing: CI must run infra/setup.sh before the tests.")
        pytest.skip(f"{CDK_CLI} is missing: run infra/setup.sh to install the pinned CDK CLI.")
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION", "AWS_PROFILE"))
    }
    environment.update(CLI_ENVIRONMENT)
    # cdk.json runs `python app.py`, which must be this interpreter with aws-cdk-lib installed,
    # also when CI calls the virtual environment's python without activating it.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    outdir = tmp_path / "cdk.out"
    result = subprocess.run(
        [
            str(CDK_CLI), "synth",
            "--no-notices", "--no-version-reporting", "--quiet",
            "--context", "labelmark:bundle=false",
            "--output", str(outdir),
        ],
        cwd=INFRA_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    template = json.loads((outdir / "Labelmark.template.json").read_text())
    types = {resource["Type"] for resource in template["Resources"].values()}
    assert "AWS::StepFunctions::StateMachine" in types
    assert "AWS::Events::Rule" in types
