"""Reviewed cdk-nag AwsSolutions findings of the labelmark stack, each with its reason.

cdk-nag 3 runs as a CDK policy validation plugin: an unacknowledged finding fails synthesis.
Each finding is acknowledged on the construct it names, by its full id, so a new wildcard or a
new resource still fails until someone reviews it here.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnElement, Stack, Validations
from constructs import IConstruct

from infra.settings import BACKFILL_PREFIX, FAILURE_PREFIX, STAGING_PREFIX
from infra.stack import LabelmarkStack

__all__ = ["suppress_reviewed_findings"]

_PLUGIN = "AwsSolutions::"

_S3_READ_REASON = (
    "Bucket.grant_read() grants the s3:GetObject*, s3:GetBucket* and s3:List* action groups "
    "on one bucket and its objects. The groups contain only read actions, and the stage reads "
    "objects whose keys come from each event, so the grant cannot name single keys."
)
_S3_WRITE_REASON = (
    "Bucket.grant_put() and grant_delete() grant the s3:Abort*, s3:PutObject* and "
    "s3:DeleteObject* groups on one key prefix of the processed bucket. Keys under the prefix "
    "are derived from each upload, so the grant cannot name single keys."
)
_EXECUTIONS = "arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:execution:"
_XRAY_REASON = (
    "Active X-Ray tracing needs xray:PutTraceSegments and xray:PutTelemetryRecords, which "
    "support no resource-level permissions, so their resource is '*'."
)


def suppress_reviewed_findings(stack: LabelmarkStack) -> None:
    """Acknowledge the AwsSolutions findings that were reviewed and accepted for STACK."""
    _acknowledge_functions(stack)
    _acknowledge_state_machine(stack)
    _acknowledge_backfill(stack)
    _acknowledge_operator_policy(stack)

    _acknowledge(
        stack.dead_letter_queue,
        "AwsSolutions-SQS3",
        "This queue is the trigger rule's dead-letter queue. Nothing consumes it "
        "automatically, and its alarm reports every message, so it needs no queue of its own.",
    )


def _acknowledge_functions(stack: LabelmarkStack) -> None:
    source = _logical_id(stack, stack.source_bucket)
    processed = _logical_id(stack, stack.processed_bucket)
    output_prefix = stack.settings.output_prefix

    for function in (stack.detect_function, stack.watermark_function, stack.store_function):
        _acknowledge(
            function,
            "AwsSolutions-L1",
            "The functions run on Python 3.12 on purpose: the bundled wheels are built for "
            "CPython 3.12, and moving to a newer runtime is a separate, tested upgrade.",
        )
        reason = _XRAY_REASON
        if function is stack.detect_function:
            reason += " The same holds for rekognition:DetectLabels."
        _acknowledge(function.role, "AwsSolutions-IAM5[Resource::*]", reason)
        for action in ("s3:GetBucket*", "s3:GetObject*", "s3:List*"):
            _acknowledge(function.role, f"AwsSolutions-IAM5[Action::{action}]", _S3_READ_REASON)

    for function in (stack.detect_function, stack.watermark_function):
        _acknowledge(
            function.role, f"AwsSolutions-IAM5[Resource::<{source}.Arn>/*]", _S3_READ_REASON
        )
    staging = f"AwsSolutions-IAM5[Resource::<{processed}.Arn>/{STAGING_PREFIX}*]"
    for function in (stack.watermark_function, stack.store_function):
        _acknowledge(function.role, "AwsSolutions-IAM5[Action::s3:Abort*]", _S3_WRITE_REASON)
        _acknowledge(function.role, staging, _S3_WRITE_REASON)

    _acknowledge(
        stack.store_function.role, "AwsSolutions-IAM5[Action::s3:DeleteObject*]", _S3_WRITE_REASON
    )
    _acknowledge(
        stack.store_function.role,
        f"AwsSolutions-IAM5[Resource::<{processed}.Arn>/{output_prefix}*]",
        "The store stage publishes every image and its labels file under the output prefix, "
        "with keys derived from the source keys.",
    )
    _acknowledge(
        stack.store_function.role,
        f"AwsSolutions-IAM5[Resource::<{processed}.Arn>/{FAILURE_PREFIX}*]",
        "Once an image is published, the store stage deletes the failure records of the runs "
        "it replays, whose keys derive from generated execution names.",
    )


def _acknowledge_state_machine(stack: LabelmarkStack) -> None:
    role = stack.state_machine.role
    _acknowledge(
        role,
        "AwsSolutions-IAM5[Resource::*]",
        "X-Ray tracing and log delivery to CloudWatch Logs need actions that support no "
        "resource-level permissions (xray:PutTraceSegments, logs:CreateLogDelivery and "
        "related), so their resource is '*'.",
    )
    for function in (stack.detect_function, stack.watermark_function, stack.store_function):
        _acknowledge(
            role,
            f"AwsSolutions-IAM5[Resource::<{_logical_id(stack, function)}.Arn>:*]",
            "Function.grant_invoke() also allows the function's versions and aliases "
            "(ARN:*), so a workflow that invokes a published version keeps working.",
        )
    processed = _logical_id(stack, stack.processed_bucket)
    _acknowledge(
        role,
        f"AwsSolutions-IAM5[Resource::<{processed}.Arn>/{FAILURE_PREFIX}*]",
        "The RecordFailure state writes one record per failed execution under this prefix, "
        "named after the execution.",
    )


def _acknowledge_backfill(stack: LabelmarkStack) -> None:
    backfill = stack.backfill
    role = backfill.state_machine.role
    pipeline = _logical_id(stack, stack.state_machine)
    own = _logical_id(stack, backfill.state_machine)
    processed = _logical_id(stack, stack.processed_bucket)

    _acknowledge(
        role,
        "AwsSolutions-IAM5[Resource::*]",
        "X-Ray tracing and log delivery to CloudWatch Logs need actions that support no "
        "resource-level permissions, so their resource is '*'.",
    )
    _acknowledge(
        role,
        f"AwsSolutions-IAM5[Resource::{_EXECUTIONS}<{pipeline}.Name>:*]",
        "A states:startExecution.sync task must describe and stop the pipeline execution it "
        "started, whose name Step Functions generates, so the ARN ends in a wildcard. This is "
        "the policy AWS documents for the .sync integration.",
    )
    _acknowledge(
        role,
        f"AwsSolutions-IAM5[Resource::<{processed}.Arn>/{BACKFILL_PREFIX}*]",
        "The Distributed Map's ResultWriter writes a manifest and result files under this "
        "prefix, in a folder named after each Map Run.",
    )
    own_executions = [f"{_EXECUTIONS}<{own}.Name>:*"]
    own_executions += [f"{_EXECUTIONS}<{own}.Name>/{label}:*" for label in backfill.map_labels]
    for resource in own_executions:
        _acknowledge(
            backfill.child_executions_policy,
            f"AwsSolutions-IAM5[Resource::{resource}]",
            "A Distributed Map runs each item as a child execution of its own state machine, "
            "with a generated name, and must describe and stop those executions.",
        )


def _acknowledge_operator_policy(stack: LabelmarkStack) -> None:
    reason = (
        "Operators inspect and redrive executions of this one state machine, whose execution "
        "names are generated, so the ARN ends in a wildcard."
    )
    # An EXPRESS pipeline gets no execution-level statement, so it has no such finding.
    if stack.settings.workflow_type == "STANDARD":
        pipeline = _logical_id(stack, stack.state_machine)
        _acknowledge(
            stack.operator_policy,
            f"AwsSolutions-IAM5[Resource::{_EXECUTIONS}<{pipeline}.Name>:*]",
            reason,
        )
    backfill = _logical_id(stack, stack.backfill_state_machine)
    _acknowledge(
        stack.operator_policy,
        f"AwsSolutions-IAM5[Resource::{_EXECUTIONS}<{backfill}.Name>:*]",
        reason,
    )


def _acknowledge(construct: IConstruct | None, rule: str, reason: str) -> None:
    if construct is None:
        raise ValueError(f"Cannot acknowledge {rule}: the construct does not exist.")
    Validations.of(construct).acknowledge(Acknowledgment(id=_PLUGIN + rule, reason=reason))


def _logical_id(stack: Stack, construct: IConstruct) -> str:
    element = construct.node.default_child
    if not isinstance(element, CfnElement):
        raise TypeError(f"{construct.node.path} has no CloudFormation resource.")
    return str(stack.resolve(stack.get_logical_id(element)))
