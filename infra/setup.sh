#!/usr/bin/env bash
# Install the AWS CDK CLI at the version pinned in infra/package-lock.json into
# infra/node_modules, so `infra/node_modules/.bin/cdk` is the CLI that synthesizes and deploys.
# Needs node and npm. Safe to run again: `npm ci` replaces node_modules with the locked tree.
set -euo pipefail

infra_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v npm >/dev/null 2>&1; then
    echo "infra/setup.sh: npm not found. Install Node.js 20 or newer with npm, then run this again." >&2
    exit 1
fi

cd "$infra_dir"
npm ci --no-audit --no-fund --loglevel=error
echo "infra/setup.sh: installed $(./node_modules/.bin/cdk --version) in $infra_dir/node_modules"
