"""The labelmark stack: buckets, trigger, state machine, three functions and their alarms."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from aws_cdk import (
    Aws,
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

from infra.bundling import (
    FUNCTION_DEPENDENCIES,
    LOCAL_BACKEND_DEPENDENCIES,
    REPO_ROOT,
    BundlingError,
    FunctionBundler,
    function_code,
)
from infra.settings import FAILURE_PREFIX, STAGING_PREFIX, StackSettings

__all__ = ["FUNCTION_SIZING", "WORKFLOW_FILE", "WORKFLOW_PLACEHOLDERS", "LabelmarkStack"]

WORKFLOW_FILE = REPO_ROOT / "workflow" / "pipeline.asl.json"
WORKFLOW_PLACEHOLDERS = (
    "DetectFunctionArn",
    "WatermarkFunctionArn",
    "StoreFunctionArn",
    "ProcessedBucket",
    "OutputPrefix",
)
DETECT_MODEL_DIR = REPO_ROOT / "functions" / "detect" / "model"


@dataclasses.dataclass(frozen=True)
class FunctionSizing:
    """Memory in MB and timeout in seconds of one Lambda function."""

    memory_mb: int
    timeout_seconds: int


# Memory and timeout of each function. The figures come from bench/RESULTS.md, which records
# the benchmark runs behind them.
# NOTE: these are initial estimates. Replace them when bench/RESULTS.md has measurements.
FUNCTION_SIZING: dict[str, FunctionSizing] = {
    "detect": FunctionSizing(memory_mb=1024, timeout_seconds=30),
    "watermark": FunctionSizing(memory_mb=1769, timeout_seconds=60),
    "store": FunctionSizing(memory_mb=256, timeout_seconds=15),
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
            environment,
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
        # and deletes the staging object. It never touches the source bucket. Reading the
        # published key lets a repeated run see that this upload is already published.
        self.processed_bucket.grant_read(self.store_function, f"{STAGING_PREFIX}*")
        self.processed_bucket.grant_read(self.store_function, f"{self.settings.output_prefix}*")
        self.processed_bucket.grant_delete(self.store_function, f"{STAGING_PREFIX}*")
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
        self.state_machine = sfn.StateMachine(
            self,
            "Workflow",
            comment="labelmark: label, watermark and publish one uploaded image",
            state_machine_type=workflow_type,
            definition_body=sfn.DefinitionBody.from_string(WORKFLOW_FILE.read_text("utf-8")),
            definition_substitutions=self._workflow_substitutions(),
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
        substitutions = {
            "DetectFunctionArn": self.detect_function.function_arn,
            "WatermarkFunctionArn": self.watermark_function.function_arn,
            "StoreFunctionArn": self.store_function.function_arn,
            "ProcessedBucket": self.processed_bucket.bucket_name,
            "OutputPrefix": self.settings.output_prefix,
        }
        # A placeholder added to the file without a value here would reach Step Functions as
        # literal text, so the two lists must agree.
        found = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", WORKFLOW_FILE.read_text("utf-8")))
        if found != set(substitutions):
            raise ValueError(
                f"{WORKFLOW_FILE} uses the placeholders {sorted(found)}, but the stack "
                f"substitutes {sorted(substitutions)}. Make the two lists equal."
            )
        return substitutions

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
        # Redrive works for STANDARD state machines only. Express executions have no
        # execution ARN of this form.
        # Built from pseudo parameters rather than format_arn(), which writes a known region
        # literally, so the ARN reads the same in every synthesis and its reviewed cdk-nag
        # finding in infra/nag.py keeps matching.
        executions = (
            f"arn:{Aws.PARTITION}:states:{Aws.REGION}:{Aws.ACCOUNT_ID}:execution:"
            f"{self.state_machine.state_machine_name}:*"
        )
        self.operator_policy = iam.ManagedPolicy(
            self,
            "OperatorPolicy",
            description="Start, inspect and redrive executions of the labelmark workflow",
            statements=[
                iam.PolicyStatement(
                    sid="StartAndListExecutions",
                    actions=["states:StartExecution", "states:ListExecutions"],
                    resources=[self.state_machine.state_machine_arn],
                ),
                iam.PolicyStatement(
                    sid="InspectAndRedriveExecutions",
                    actions=[
                        "states:DescribeExecution",
                        "states:GetExecutionHistory",
                        "states:RedriveExecution",
                    ],
                    resources=[executions],
                ),
            ],
        )

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
            "ExecutionsConsoleUrl",
            value=f"https://{region}.console.aws.amazon.com/states/home?region={region}"
            f"#/statemachines/view/{arn}",
        )
        CfnOutput(self, "OperatorPolicyArn", value=self.operator_policy.managed_policy_arn)
        CfnOutput(self, "AlarmTopicArn", value=self.alarm_topic.topic_arn)
