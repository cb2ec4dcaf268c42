// A sandbox killed under a streaming command or runCode, seen by the unmodified JS SDKs (server from
// E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). Prints one line per check, exits non-zero on failure.
import assert from 'node:assert/strict'
import { Sandbox, TimeoutError } from '@e2b/code-interpreter'

const TEMPLATE = 'code-interpreter-v1'
// "Within a couple of seconds", with room for a loaded machine; a client timeout would take minutes.
const ENDS_WITHIN_MS = 10_000

async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

// Starts `call(started)`, waits until it calls `started` (its stream is open), then runs `kill` and
// returns what the call threw and how long after the kill it did.
async function killedWhileStreaming(call, kill) {
  let started
  const open = new Promise((resolve) => { started = resolve })
  const outcome = call(() => started()).then(() => ({ error: undefined }), (error) => ({ error }))
  await Promise.race([open, outcome.then(({ error }) => { throw error ?? new Error('ended before it began') })])
  const killedAt = Date.now()
  await kill()
  const { error } = await outcome
  return { error, afterMs: Date.now() - killedAt }
}

await check('command killed', async () => {
  const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 120_000 })
  const { error, afterMs } = await killedWhileStreaming(
    (started) => sbx.commands.run('echo started; sleep 600', { timeoutMs: 0, onStdout: started }),
    () => Sandbox.kill(sbx.sandboxId))
  assert.ok(error instanceof TimeoutError, String(error))
  assert.match(error.message, /The sandbox was killed or reached its end of life while the request was in flight/)
  assert.ok(afterMs < ENDS_WITHIN_MS, `ended ${afterMs} ms after the kill`)
})

await check('runCode killed', async () => {
  const sbx = await Sandbox.create(TEMPLATE, { timeoutMs: 120_000 })
  const { error, afterMs } = await killedWhileStreaming(
    (started) => sbx.runCode("print('started', flush=True)\nimport time\ntime.sleep(600)",
      { timeoutMs: 0, onStdout: started }),
    () => sbx.kill())
  assert.ok(error instanceof TimeoutError, String(error))
  assert.match(error.message, /The sandbox was killed while the request was in progress/)
  assert.ok(afterMs < ENDS_WITHIN_MS, `ended ${afterMs} ms after the kill`)
})
