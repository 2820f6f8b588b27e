"""The backfill state machine: one pipeline run for every object already under a source prefix.

Its definition is `workflow/backfill.asl.json`. A Distributed Map lists the prefix with
ListObjectsV2 and starts one child execution per object. Each child starts the pipeline state
machine with `states:startExecution.sync:2` and waits for it to end. The Map Run writes its
results under `labelmark-backfill/` in the processed bucket. `labelmark backfill --cloud` starts
it with the input `{"prefix": PREFIX}`.
"""

from __future__ import annotations

from aws_cdk import Aws, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.definitions import BACKFILL_FILE, DefinitionError, definition_body, distributed_maps
from infra.settings import BACKFILL_PREFIX, StackSettings

__all__ = ["SYNC_EVENTS_RULE", "BackfillStateMachine", "execution_arn"]

# `.sync` integrations learn that a child execution ended from this EventBridge rule, which
# Step Functions creates and manages in the account.
SYNC_EVENTS_RULE = "StepFunctionsGetEventsForStepFunctionsExecutionRule"


def execution_arn(state_machine_name: str, suffix: str = ":*") -> str:
    """Return the ARN pattern of STATE_MACHINE_NAME's executions, ending in SUFFIX.

    Built from pseudo parameters rather than with format_arn(), which writes a known region
    literally, so the ARN reads the same in every synthesis and its reviewed cdk-nag finding
    in infra/nag.py keeps matching.
    """
    return (
        f"arn:{Aws.PARTITION}:states:{Aws.REGION}:{Aws.ACCOUNT_ID}:execution:"
        f"{state_machine_name}{suffix}"
    )


class BackfillStateMachine(Construct):
    """Deploy workflow/backfill.asl.json with a role limited to what its states call."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings,
        stack_name: str,
        source_bucket: s3.IBucket,
        processed_bucket: s3.IBucket,
        pipeline: sfn.StateMachine,
        log_retention: logs.RetentionDays,
    ) -> None:
        super().__init__(scope, construct_id)
        self.map_labels = _map_labels()

        self.log_group = logs.LogGroup(
            self,
            "LogGroup",
            log_group_name=f"/aws/vendedlogs/states/{stack_name}-backfill",
            retention=log_retention,
            removal_policy=RemovalPolicy.DESTROY,
        )

        substitutions = {
            "SourceBucket": source_bucket.bucket_name,
            "ProcessedBucket": processed_bucket.bucket_name,
            "PipelineStateMachineArn": pipeline.state_machine_arn,
        }
        # A Distributed Map can only run in a STANDARD state machine, whatever type the
        # pipeline has. The log settings are the pipeline's, for the same reasons.
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            comment="labelmark: run the pipeline for every object under a source prefix",
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=definition_body(BACKFILL_FILE, substitutions),
            definition_substitutions=substitutions,
            logs=sfn.LogOptions(
                destination=self.log_group,
                level=sfn.LogLevel[settings.workflow_log_level],
                include_execution_data=settings.workflow_log_execution_data,
            ),
            tracing_enabled=True,
        )

        self._grant_item_reader(source_bucket)
        self._grant_pipeline_runs(pipeline)
        self._grant_child_executions()
        self._grant_result_writer(processed_bucket)

    def _grant_item_reader(self, source_bucket: s3.IBucket) -> None:
        # The ItemReader calls ListObjectsV2 on the prefix from the execution input, so the
        # grant cannot name the prefix. Listing reads no object content.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[source_bucket.bucket_arn])
        )

    def _grant_pipeline_runs(self, pipeline: sfn.StateMachine) -> None:
        # The policy AWS documents for `states:startExecution.sync`: start the child, follow
        # and stop its executions, and maintain the managed rule that reports their end.
        # NOTE: with workflowType=EXPRESS the pipeline's executions have `express:` ARNs,
        # which the execution grant below may not cover. A backfill over an EXPRESS pipeline
        # has not been run.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["states:StartExecution"], resources=[pipeline.state_machine_arn]
            )
        )
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["states:DescribeExecution", "states:StopExecution"],
                resources=[execution_arn(pipeline.state_machine_name)],
            )
        )
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["events:PutTargets", "events:PutRule", "events:DescribeRule"],
                resources=[
                    f"arn:{Aws.PARTITION}:events:{Aws.REGION}:{Aws.ACCOUNT_ID}:rule/"
                    f"{SYNC_EVENTS_RULE}"
                ],
            )
        )

    def _grant_child_executions(self) -> None:
        # The Map Run starts its child executions as executions of this state machine. AWS's
        # example policy for a Distributed Map names `execution:<name>:*`, but a child's ARN
        # has the form `execution:<name>/<label>:<id>`, which that pattern does not match, so
        # both are granted. These statements name the state machine itself, and the state
        # machine depends on its role's default policy, so they go into a policy of their own
        # to avoid a dependency cycle.
        name = self.state_machine.state_machine_name
        child_executions = [execution_arn(name, f"/{label}:*") for label in self.map_labels]
        policy = iam.Policy(self, "ChildExecutionsPolicy")
        self.child_executions_policy = policy
        policy.add_statements(
            iam.PolicyStatement(
                actions=["states:StartExecution"], resources=[self.state_machine.state_machine_arn]
            ),
            iam.PolicyStatement(
                actions=["states:DescribeExecution", "states:StopExecution"],
                resources=[execution_arn(name), *child_executions],
            ),
        )
        self.state_machine.role.attach_inline_policy(policy)

    def _grant_result_writer(self, processed_bucket: s3.IBucket) -> None:
        # The ResultWriter uploads the Map Run's manifest and result files, in parts when they
        # are large, and may read and abort its own uploads under the prefix.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=[
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:ListMultipartUploadParts",
                    "s3:AbortMultipartUpload",
                ],
                resources=[processed_bucket.arn_for_objects(f"{BACKFILL_PREFIX}*")],
            )
        )


def _map_labels() -> list[str]:
    """Return the Labels of the file's Distributed Maps, after checking what the grants assume.

    The child executions of a Map Run have ARNs of the form `execution:<name>/<label>:<id>`, so
    the grants on them need each map's Label. The ResultWriter grant covers BACKFILL_PREFIX only.
    """
    labels = []
    for name, state in distributed_maps(BACKFILL_FILE).items():
        label = state.get("Label")
        if not label:
            raise DefinitionError(
                f"The Distributed Map state {name!r} in {BACKFILL_FILE} has no Label. Add one, "
                "so that the IAM permissions on its child executions can name it."
            )
        writer = state.get("ResultWriter")
        prefix = str(writer.get("Parameters", {}).get("Prefix", "")) if writer else None
        if prefix is not None and f"{prefix.rstrip('/')}/" != BACKFILL_PREFIX:
            raise DefinitionError(
                f"The ResultWriter of {name!r} in {BACKFILL_FILE} writes under {prefix!r}, but "
                f"the backfill role may write only under {BACKFILL_PREFIX!r}. Use that prefix."
            )
        labels.append(str(label))
    if not labels:
        raise DefinitionError(f"{BACKFILL_FILE} has no Distributed Map state.")
    return labels
