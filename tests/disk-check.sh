# Sourced by tests/run.sh and .ci/run before they build, with
# CARGO_TARGET_DIR set.
#
# A disk that fills during the build shows up as a linker crash ("ld
# terminated with signal 7 [Bus error]"), not as "no space left". The reused
# build directory is only a cache: a fresh debug build of the suite takes
# about 16 GiB, a rebuild over a warm one a few. When the disk under a warm
# one has less free than that, start it afresh; warn when even a fresh build
# will not fit.
warm_gib=5
fresh_gib=18
free_gib() { df -Pk "$1" | awk 'NR == 2 { print int($4 / 1048576) }'; }
mkdir -p "$CARGO_TARGET_DIR"
if [ -d "$CARGO_TARGET_DIR/debug" ] && [ "$(free_gib "$CARGO_TARGET_DIR")" -lt "$warm_gib" ]; then
    echo "tests: $(free_gib "$CARGO_TARGET_DIR") GiB free under $CARGO_TARGET_DIR; removing its debug build (a cache) to build afresh" >&2
    rm -rf "$CARGO_TARGET_DIR/debug"
fi
if [ ! -d "$CARGO_TARGET_DIR/debug" ] && [ "$(free_gib "$CARGO_TARGET_DIR")" -lt "$fresh_gib" ]; then
    echo "tests: warning: only $(free_gib "$CARGO_TARGET_DIR") GiB free under $CARGO_TARGET_DIR; a fresh build and the tests need about $fresh_gib GiB. If the link fails with 'signal 7 [Bus error]', free disk space (or point CARGO_TARGET_DIR at a larger disk) and run again." >&2
fi
