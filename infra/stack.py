"""The labelmark stack: buckets, trigger, state machine, three functions and their alarms."""

from __future__ import annotations

import dataclasses
from typing import Any

from aws_cdk import (
    CfnOutput,
    Duration,
    RemovalPolicy,
    Stack,
)
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from functions.watermark.settings import PILLOW_ENVIRONMENT
from infra.backfill import BackfillStateMachine, execution_arn
from infra.bundling import (
    FUNCTION_DEPENDENCIES,
    LOCAL_BACKEND_DEPENDENCIES,
    REPO_ROOT,
    BundlingError,
    FunctionBundler,
    function_code,
)
from infra.definitions import WORKFLOW_FILE, WORKFLOW_PLACEHOLDERS, definition_body
from infra.settings import FAILURE_PREFIX, STAGING_PREFIX, StackSettings

__all__ = ["FUNCTION_SIZING", "WORKFLOW_FILE", "WORKFLOW_PLACEHOLDERS", "LabelmarkStack"]

DETECT_MODEL_DIR = REPO_ROOT / "functions" / "detect" / "model"


@dataclasses.dataclass(frozen=True)
class FunctionSizing:
    """Memory in MB and timeout in seconds of one Lambda function."""

    memory_mb: int
    timeout_seconds: int


# Memory and timeout of each function, sized from bench/RESULTS.md. Those figures come from a
# 2-core x86_64 machine with Python 3.11, and Lambda runs Python 3.12 on arm64, so they guide the
# sizes but do not measure the deployed functions.
#
# Lambda gives a function CPU in proportion to its memory, one full vCPU at 1,769 MB. Up to
# that size, a CPU-bound invocation costs about the same (price is memory times duration) and
# ends sooner. Above it, single-threaded work gains nothing.
#
# - watermark, 1,769 MB: rendering an 8 to 12 MP photo took 72 to 74 ms per image on one core,
#   with Pillow keeping freed image memory (PILLOW_ENVIRONMENT). It peaked 109 MiB above the
#   process's size after imports (149 MiB resident in all), and Pillow keeps at most 256 MiB.
#   Pillow decodes, draws and encodes on one thread, so one vCPU is the fastest size at about
#   the same cost per image as a smaller one.
# - detect, 1,024 MB: the local model labelled a 12 MP JPEG in 53 ms (median, 82 ms slowest) on
#   2 cores and started cold in 240 ms. With Rekognition, the function mostly waits for the API,
#   so more CPU buys little. Decoding and encoding alone peaked at 53 MiB for the same photos.
# - store, 256 MB: it copies objects within S3 and started cold in 39 ms.
#
# NOTE: the benchmark photos are 8 to 12 MP, but MAX_PIXELS accepts up to 100 MP. Scaled
# linearly from the 8 MP end, a 100 MP photo would need about 1.4 GB in watermark (14 bytes per
# pixel) and 0.7 GB to decode in detect (7 bytes per pixel), plus the object's bytes (up to
# 200 MiB). These are estimates, not measurements. A function that runs out of memory fails
# its execution with a failure record.
#
# Timeouts: the pipeline retries Sandbox.Timedout and States.Timeout 3 times, after waits of up
# to 1, 2 and 4 s, so a stage that always times out takes 4 x timeout + 7 s. With timeouts
# summing to 60 s, the slowest run is 4 x 60 + 3 x 7 s plus the retries of RecordFailure
# (7 s), 268 s in all, within the 5-minute limit of an EXPRESS execution. Each timeout is still
# more than 40 times the stage's slowest measured cold start plus one call (detect: 338 ms and
# 82 ms), which leaves room for the S3 transfers and Rekognition calls that the benchmark does
# not cover. tests/test_infra.py recomputes the 268 s from workflow/pipeline.asl.json.
# A stalled S3 or Rekognition call can outlast these timeouts, because the SDK client in
# functions/common/aws.py waits up to 30 s per read. Lambda then stops the invocation with
# Sandbox.Timedout, which the pipeline retries like the SDK's own timeout error.
FUNCTION_SIZING: dict[str, FunctionSizing] = {
    "detect": FunctionSizing(memory_mb=1024, timeout_seconds=20),
    "watermark": FunctionSizing(memory_mb=1769, timeout_seconds=30),
    "store": FunctionSizing(memory_mb=256, timeout_seconds=10),
}

# EventBridge retries a failed StartExecution with backoff. After this age or this many
# attempts the event goes to the dead-letter queue, whose alarm notifies an operator, instead
# of being retried quietly for EventBridge's default of 24 hours.
TRIGGER_MAX_EVENT_AGE = Duration.hours(6)
TRIGGER_RETRY_ATTEMPTS = 50

LOG_RETENTION = logs.RetentionDays.ONE_MONTH
ACCESS_LOG_RETENTION = Duration.days(90)
# Versioning keeps an overwritten or deleted original for this long.
NONCURRENT_SOURCE_RETENTION = Duration.days(30)


class LabelmarkStack(Stack):
    """Deploy the labelmark pipeline: upload to the source bucket, publish to the processed one."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.settings = settings or StackSettings.from_context(self.node)

        self._create_buckets()
        self._create_functions()
        self._create_state_machine()
        self._create_backfill()
        self._create_trigger()
        self._create_operator_policy()
        self._create_alarms()
        self._create_outputs()

    # Storage

    def _create_buckets(self) -> None:
        self.access_log_bucket = s3.Bucket(
            self,
            "AccessLogBucket",
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(id="ExpireAccessLogs", expiration=ACCESS_LOG_RETENTION)
            ],
        )

        # Versioning is on so that a run reads the exact version its event names even if the
        # key is overwritten meanwhile, and each upload of a key gets its own execution name
        # (functions/common/keys.py digests the version id). Old versions expire after 30 days.
        self.source_bucket = s3.Bucket(
            self,
            "SourceBucket",
            bucket_name=self.settings.source_bucket_name,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            versioned=True,
            server_access_logs_bucket=self.access_log_bucket,
            server_access_logs_prefix="source/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireOldVersions",
                    noncurrent_version_expiration=NONCURRENT_SOURCE_RETENTION,
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                )
            ],
        )
        # Same effect as `event_bridge_enabled=True`, but set as the bucket's own CloudFormation
        # property, so CDK deploys no custom-resource function to manage the notification.
        # Adding S3 event notifications to this bucket through CDK would replace it.
        source_cfn = self.source_bucket.node.default_child
        assert isinstance(source_cfn, s3.CfnBucket)
        source_cfn.notification_configuration = s3.CfnBucket.NotificationConfigurationProperty(
            event_bridge_configuration=s3.CfnBucket.EventBridgeConfigurationProperty(
                event_bridge_enabled=True
            )
        )

        # Published images can be rebuilt from the originals, so this bucket is not versioned.
        self.processed_bucket = s3.Bucket(
            self,
            "ProcessedBucket",
            bucket_name=self.settings.processed_bucket_name,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            server_access_logs_bucket=self.access_log_bucket,
            server_access_logs_prefix="processed/",
            lifecycle_rules=[
                # The store stage deletes its staging object, and this rule removes what a
                # failed run leaves behind.
                s3.LifecycleRule(
                    id="ExpireStaging",
                    prefix=STAGING_PREFIX,
                    expiration=Duration.days(1),
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                ),
                s3.LifecycleRule(
                    id="AbortIncompleteUploads",
                    abort_incomplete_multipart_upload_after=Duration.days(7),
                ),
            ],
        )

    # Functions

    def _create_functions(self) -> None:
        environment = self.settings.function_environment(self.processed_bucket.bucket_name)
        local_backend = self.settings.detector_backend == "local"

        detect_dependencies = FUNCTION_DEPENDENCIES["detect"]
        if local_backend:
            detect_dependencies += LOCAL_BACKEND_DEPENDENCIES
            self._check_detect_model()

        self.detect_function = self._create_function(
            "detect",
            FunctionBundler(
                "detect",
                detect_dependencies,
                install_dependencies=self.settings.install_dependencies,
                # The Rekognition backend does not read the local model, so it stays out.
                exclude_subfolders=() if local_backend else ("model",),
            ),
            environment,
            reserved_concurrency=self.settings.detect_reserved_concurrency,
        )
        self.watermark_function = self._create_function(
            "watermark",
            FunctionBundler(
                "watermark",
                FUNCTION_DEPENDENCIES["watermark"],
                install_dependencies=self.settings.install_dependencies,
            ),
            {**environment, **PILLOW_ENVIRONMENT},
        )
        self.store_function = self._create_function(
            "store",
            FunctionBundler(
                "store",
                FUNCTION_DEPENDENCIES["store"],
                install_dependencies=self.settings.install_dependencies,
            ),
            environment,
        )

        # Detect reads the original and labels it.
        self.source_bucket.grant_read(self.detect_function)
        if not local_backend:
            # DetectLabels supports no resource-level permissions, so the resource is "*".
            self.detect_function.add_to_role_policy(
                iam.PolicyStatement(actions=["rekognition:DetectLabels"], resources=["*"])
            )

        # Watermark reads the original and stages its result in the processed bucket.
        self.source_bucket.grant_read(self.watermark_function)
        self.processed_bucket.grant_put(self.watermark_function, f"{STAGING_PREFIX}*")

        # Store moves the staged image to its published key, writes the labels next to it
        # and deletes the staging object and the failure records of the runs it replays. It
        # never touches the source bucket. Reading the published key lets a repeated run see
        # that this upload is already published.
        self.processed_bucket.grant_read(self.store_function, f"{STAGING_PREFIX}*")
        self.processed_bucket.grant_read(self.store_function, f"{self.settings.output_prefix}*")
        self.processed_bucket.grant_delete(self.store_function, f"{STAGING_PREFIX}*")
        self.processed_bucket.grant_delete(self.store_function, f"{FAILURE_PREFIX}*")
        self.processed_bucket.grant_put(self.store_function, f"{self.settings.output_prefix}*")

    def _create_function(
        self,
        name: str,
        bundler: FunctionBundler,
        environment: dict[str, str],
        *,
        reserved_concurrency: int | None = None,
    ) -> lambda_.Function:
        title = name.capitalize()
        sizing = FUNCTION_SIZING[name]

        log_group = logs.LogGroup(
            self,
            f"{title}LogGroup",
            retention=LOG_RETENTION,
            removal_policy=RemovalPolicy.DESTROY,
        )
        # An own role, instead of the AWSLambdaBasicExecutionRole managed policy, limits log
        # writes to this function's log group.
        role = iam.Role(
            self,
            f"{title}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"labelmark {name} function",
        )
        log_group.grant_write(role)

        return lambda_.Function(
            self,
            f"{title}Function",
            description=f"labelmark {name} stage",
            runtime=lambda_.Runtime.PYTHON_3_12,
            architecture=lambda_.Architecture.ARM_64,
            handler=f"functions.{name}.handler.handler",
            code=function_code(bundler),
            memory_size=sizing.memory_mb,
            timeout=Duration.seconds(sizing.timeout_seconds),
            environment=environment,
            tracing=lambda_.Tracing.ACTIVE,
            role=role,
            log_group=log_group,
            reserved_concurrent_executions=reserved_concurrency,
        )

    def _check_detect_model(self) -> None:
        # Without bundling the asset cannot be deployed anyway, so a missing model only
        # matters when dependencies are installed for real.
        if not self.settings.install_dependencies:
            return
        if not DETECT_MODEL_DIR.is_dir() or not any(DETECT_MODEL_DIR.iterdir()):
            raise BundlingError(
                f"detectorBackend is 'local', but the model folder {DETECT_MODEL_DIR} is "
                "missing or empty. Build the model files there first (the project's install "
                "step does), or deploy with detectorBackend=rekognition."
            )

    # Workflow

    def _create_state_machine(self) -> None:
        workflow_type = sfn.StateMachineType[self.settings.workflow_type]

        # Step Functions accepts log group names under /aws/vendedlogs/ without growing the
        # account's CloudWatch Logs resource policy, which has a 5,120 character limit.
        self.workflow_log_group = logs.LogGroup(
            self,
            "WorkflowLogGroup",
            log_group_name=f"/aws/vendedlogs/states/{self.stack_name}-workflow",
            retention=LOG_RETENTION,
            removal_policy=RemovalPolicy.DESTROY,
        )

        # STANDARD runs exactly once per start, keeps 90 days of execution history and can be
        # redriven from the failed state, which suits a pipeline that writes objects.
        # EXPRESS costs less at high volume but runs at least once, at most 5 minutes, keeps
        # its history only in the log group, and supports no redrive.
        #
        # The log level defaults to ALL without execution data: every state transition is
        # logged with its timing, which EXPRESS needs as its only history, but no input or
        # output, because those contain object keys that may be private file names.
        substitutions = self._workflow_substitutions()
        self.state_machine = sfn.StateMachine(
            self,
            "Workflow",
            comment="labelmark: label, watermark and publish one uploaded image",
            state_machine_type=workflow_type,
            definition_body=definition_body(WORKFLOW_FILE, substitutions),
            definition_substitutions=substitutions,
            logs=sfn.LogOptions(
                destination=self.workflow_log_group,
                level=sfn.LogLevel[self.settings.workflow_log_level],
                include_execution_data=self.settings.workflow_log_execution_data,
            ),
            tracing_enabled=True,
        )

        # The definition comes from a file, so CDK cannot derive the role's permissions from
        # it. grant_invoke covers each function's ARN and its versions and aliases (ARN:*).
        for function in (self.detect_function, self.watermark_function, self.store_function):
            function.grant_invoke(self.state_machine)
        # The RecordFailure state writes through the aws-sdk:s3:putObject integration.
        self.state_machine.add_to_role_policy(
            iam.PolicyStatement(
                actions=["s3:PutObject"],
                resources=[self.processed_bucket.arn_for_objects(f"{FAILURE_PREFIX}*")],
            )
        )

    def _workflow_substitutions(self) -> dict[str, str]:
        return {
            "DetectFunctionArn": self.detect_function.function_arn,
            "WatermarkFunctionArn": self.watermark_function.function_arn,
            "StoreFunctionArn": self.store_function.function_arn,
            "ProcessedBucket": self.processed_bucket.bucket_name,
            "OutputPrefix": self.settings.output_prefix,
        }

    def _create_backfill(self) -> None:
        self.backfill = BackfillStateMachine(
            self,
            "Backfill",
            settings=self.settings,
            stack_name=self.stack_name,
            source_bucket=self.source_bucket,
            processed_bucket=self.processed_bucket,
            pipeline=self.state_machine,
            log_retention=LOG_RETENTION,
        )
        self.backfill_state_machine = self.backfill.state_machine

    def _create_trigger(self) -> None:
        # The dead-letter queue only receives events, and nothing reads it automatically, so
        # it needs no dead-letter queue of its own. Its alarm notifies an operator.
        self.dead_letter_queue = sqs.Queue(
            self,
            "TriggerDeadLetterQueue",
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            retention_period=Duration.days(14),
        )

        self.trigger_rule = events.Rule(
            self,
            "UploadRule",
            description="Start the labelmark workflow for each object created in the source bucket",
            event_pattern=events.EventPattern(
                source=["aws.s3"],
                detail_type=["Object Created"],
                detail={"bucket": {"name": [self.source_bucket.bucket_name]}},
            ),
        )
        self.trigger_rule.add_target(
            targets.SfnStateMachine(
                self.state_machine,
                dead_letter_queue=self.dead_letter_queue,
                max_event_age=TRIGGER_MAX_EVENT_AGE,
                retry_attempts=TRIGGER_RETRY_ATTEMPTS,
            )
        )

    def _create_operator_policy(self) -> None:
        self.operator_policy = iam.ManagedPolicy(
            self,
            "OperatorPolicy",
            description="Start and inspect labelmark workflow and backfill executions",
            statements=[
                *self._pipeline_operator_statements(),
                *self._backfill_operator_statements(),
            ],
        )

    def _pipeline_operator_statements(self) -> list[iam.PolicyStatement]:
        pipeline = self.state_machine
        if self.settings.workflow_type == "EXPRESS":
            # EXPRESS executions support neither redrive nor GetExecutionHistory, and
            # DescribeExecution and ListExecutions only inside a Map Run. Their history is
            # the log group.
            return [
                iam.PolicyStatement(
                    sid="StartExecutions",
                    actions=["states:StartExecution"],
                    resources=[pipeline.state_machine_arn],
                ),
                iam.PolicyStatement(
                    sid="ReadExecutionLogs",
                    actions=[
                        "logs:DescribeLogStreams",
                        "logs:FilterLogEvents",
                        "logs:GetLogEvents",
                    ],
                    resources=[self.workflow_log_group.log_group_arn],
                ),
            ]
        return [
            iam.PolicyStatement(
                sid="StartAndListExecutions",
                actions=["states:StartExecution", "states:ListExecutions"],
                resources=[pipeline.state_machine_arn],
            ),
            iam.PolicyStatement(
                sid="InspectAndRedriveExecutions",
                actions=[
                    "states:DescribeExecution",
                    "states:GetExecutionHistory",
                    "states:RedriveExecution",
                ],
                resources=[execution_arn(pipeline.state_machine_name)],
            ),
        ]

    def _backfill_operator_statements(self) -> list[iam.PolicyStatement]:
        # `labelmark backfill --cloud` starts the backfill. Redriving a failed backfill
        # execution runs its Map Run's failed children again.
        backfill = self.backfill_state_machine
        return [
            iam.PolicyStatement(
                sid="StartAndListBackfills",
                actions=["states:StartExecution", "states:ListExecutions"],
                resources=[backfill.state_machine_arn],
            ),
            iam.PolicyStatement(
                sid="InspectAndRedriveBackfills",
                actions=[
                    "states:DescribeExecution",
                    "states:GetExecutionHistory",
                    "states:RedriveExecution",
                ],
                resources=[execution_arn(backfill.state_machine_name)],
            ),
        ]

    # Operations

    def _create_alarms(self) -> None:
        # SNS encryption needs a customer managed key, because CloudWatch must be allowed to
        # use the key to publish alarms, and the policy of an AWS managed key cannot be changed.
        self.alarm_key = kms.Key(
            self,
            "AlarmTopicKey",
            description="Encrypts the labelmark alarm topic",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.DESTROY,
        )
        self.alarm_key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowCloudWatchAlarmsToPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            )
        )
        self.alarm_topic = sns.Topic(
            self,
            "AlarmTopic",
            display_name="labelmark alarms",
            master_key=self.alarm_key,
            enforce_ssl=True,
        )
        if self.settings.alarm_email:
            self.alarm_topic.add_subscription(
                subscriptions.EmailSubscription(self.settings.alarm_email)
            )
        alarm_action = cloudwatch_actions.SnsAction(self.alarm_topic)

        self.failed_executions_alarm = cloudwatch.Alarm(
            self,
            "ExecutionsFailedAlarm",
            alarm_description="A labelmark workflow execution failed. Its failure record is "
            "under labelmark-failures/ in the processed bucket.",
            metric=self.state_machine.metric_failed(
                period=Duration.minutes(5), statistic=cloudwatch.Stats.SUM
            ),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.failed_executions_alarm.add_alarm_action(alarm_action)

        self.dead_letter_alarm = cloudwatch.Alarm(
            self,
            "DeadLetterQueueAlarm",
            alarm_description="EventBridge could not start the labelmark workflow for an "
            "upload. The event is in the dead-letter queue.",
            metric=self.dead_letter_queue.metric_approximate_number_of_messages_visible(
                period=Duration.minutes(5), statistic=cloudwatch.Stats.MAXIMUM
            ),
            threshold=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.dead_letter_alarm.add_alarm_action(alarm_action)

    def _create_outputs(self) -> None:
        region = self.region
        arn = self.state_machine.state_machine_arn
        CfnOutput(self, "SourceBucketName", value=self.source_bucket.bucket_name)
        CfnOutput(self, "ProcessedBucketName", value=self.processed_bucket.bucket_name)
        CfnOutput(self, "StateMachineArn", value=arn)
        CfnOutput(
            self,
            "BackfillStateMachineArn",
            value=self.backfill_state_machine.state_machine_arn,
            description="Pass to `labelmark backfill --cloud --state-machine-arn`",
        )
        CfnOutput(
            self,
            "ExecutionsConsoleUrl",
            value=f"https://{region}.console.aws.amazon.com/states/home?region={region}"
            f"#/statemachines/view/{arn}",
        )
        CfnOutput(self, "OperatorPolicyArn", value=self.operator_policy.managed_policy_arn)
        CfnOutput(self, "AlarmTopicArn", value=self.alarm_topic.topic_arn)
