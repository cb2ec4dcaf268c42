// Pause, connect (resume) and fork through a real `corral serve` with the unmodified e2b JS SDK. The server
// comes from E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Prints one line per check, exits non-zero on failure.
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

const sbx = await Sandbox.create('base', { timeoutMs: 120_000 })
try {
  await check('pause and connect', async () => {
    await sbx.files.write('/home/user/js.txt', 'from js')
    await sbx.commands.run("nohup sh -c 'sleep 600' >/dev/null 2>&1 &")
    assert.equal(await sbx.pause(), true)
    assert.equal(await Sandbox.pause(sbx.sandboxId), false)
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
    const resumed = await Sandbox.connect(sbx.sandboxId)
    assert.equal(await resumed.files.read('/home/user/js.txt'), 'from js')
    assert.match((await resumed.commands.run('ps -eo args')).stdout, /sleep 600/)
    assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'running')
  })

  await check('fork', async () => {
    const forks = await sbx.fork({ count: 2 })
    assert.equal(forks.length, 2)
    try {
      for (const f of forks) {
        assert.ok(f instanceof Sandbox, String(f))
        assert.notEqual(f.sandboxId, sbx.sandboxId)
        assert.equal(await f.files.read('/home/user/js.txt'), 'from js')
      }
      await forks[0].files.write('/home/user/only0', 'x')
      assert.equal(await forks[1].files.exists('/home/user/only0'), false)
      assert.equal(await sbx.files.exists('/home/user/only0'), false)
    } finally {
      for (const f of forks) if (f instanceof Sandbox) await f.kill()
    }
  })
} finally {
  await sbx.kill()
}
console.log('passed')
