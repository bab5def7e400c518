#!/bin/sh
# Refreshes the browser libraries the chat page uses from their npm packages, at the versions
# pinned below: `npm pack` fetches each package's tarball (nothing is installed) and its minified
# browser build and license files are copied here unchanged. Nothing is loaded from a CDN.
#
# To upgrade: change a version, run `static/vendor/refresh.sh`, run tests/test_browser.py (which
# checks that the files here are the pinned versions) and commit the result.
set -eu

MARKDOWN_IT_VERSION=15.0.3
DOMPURIFY_VERSION=3.5.0
# highlight.js's prebuilt browser builds are published as this package (`highlight.js` holds
# its sources only).
HIGHLIGHT_JS_VERSION=11.12.0

vendor=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# unpack PACKAGE@VERSION: the package's files, in $work/package.
unpack() {
    rm -rf "$work/package"
    tarball=$(cd "$work" && npm pack --silent "$1")
    tar -xzf "$work/$tarball" -C "$work"
}

unpack "markdown-it@$MARKDOWN_IT_VERSION"
# An ES module; named .js because the server serves scripts by that extension.
cp "$work/package/dist/browser/markdown-it.esm.min.mjs" "$vendor/markdown-it.min.js"
cp "$work/package/LICENSE" "$vendor/markdown-it.LICENSE"

unpack "dompurify@$DOMPURIFY_VERSION"
cp "$work/package/dist/purify.min.js" "$vendor/purify.min.js"
# DOMPurify is dual-licensed: Apache 2.0 or MPL 2.0.
cp "$work/package/LICENSE" "$vendor/dompurify.LICENSE"
cp "$work/package/LICENSE-MPL" "$vendor/dompurify.LICENSE-MPL"

unpack "@highlightjs/cdn-assets@$HIGHLIGHT_JS_VERSION"
cp "$work/package/es/highlight.min.js" "$vendor/highlight.min.js"
cp "$work/package/LICENSE" "$vendor/highlight.js.LICENSE"

echo "vendored markdown-it $MARKDOWN_IT_VERSION, DOMPurify $DOMPURIFY_VERSION, highlight.js $HIGHLIGHT_JS_VERSION"
