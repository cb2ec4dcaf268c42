// Drives a real `corral serve` with the unmodified e2b JS SDK. The server comes from the environment:
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Prints one line per check, exits non-zero on failure.
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError, NotFoundError, SandboxNotFoundError } from 'e2b'

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

const tag = `js-${Date.now()}`
const sbx = await Sandbox.create('base', { metadata: { tag }, envs: { GREETING: 'hola' }, timeoutMs: 120_000 })

await check('commands', async () => {
  assert.equal((await sbx.commands.run('echo $GREETING $(whoami)')).stdout, 'hola user\n')
  await assert.rejects(sbx.commands.run('exit 7'), (e) => e instanceof CommandExitError && e.exitCode === 7)
  const bg = await sbx.commands.run('sleep 30', { background: true })
  assert.equal(await sbx.commands.kill(bg.pid), true)
  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'piped\n')
  await sbx.commands.closeStdin(cat.pid)
  assert.equal((await cat.wait()).stdout, 'piped\n')
})

await check('pty', async () => {
  let output = ''
  const decoder = new TextDecoder()
  const terminal = await sbx.pty.create({ cols: 90, rows: 20, onData: (d) => { output += decoder.decode(d) } })
  await sleep(800)
  await sbx.pty.sendInput(terminal.pid, new TextEncoder().encode('stty size; exit\n'))
  await terminal.wait()
  assert.match(output, /20 90/)
})

await check('files', async () => {
  await sbx.files.write('/home/user/js.txt', 'from node')
  assert.equal(await sbx.files.read('/home/user/js.txt'), 'from node')
  assert.ok((await sbx.files.list('/home/user')).some((e) => e.name === 'js.txt'))
  const events = []
  const watcher = await sbx.files.watchDir('/home/user', (e) => events.push(e))
  await sbx.files.write('/home/user/w.txt', 'x')
  for (let i = 0; i < 100 && !events.some((e) => e.name === 'w.txt'); i++) await sleep(50)
  await watcher.stop()
  assert.ok(events.some((e) => e.name === 'w.txt'))
  const url = await sbx.downloadUrl('/home/user/js.txt')
  assert.equal(await (await fetch(url)).text(), 'from node')
})

await check('list and info', async () => {
  const other = await Sandbox.create('base', { metadata: { tag } })
  const pages = []
  const paginator = Sandbox.list({ query: { metadata: { tag } }, limit: 1 })
  while (paginator.hasNext) pages.push(await paginator.nextItems())
  assert.deepEqual(pages.map((p) => p.length), [1, 1])
  const info = await sbx.getInfo()
  assert.equal(info.metadata.tag, tag)
  assert.equal(await Sandbox.kill(other.sandboxId), true)
  assert.equal(await Sandbox.kill(other.sandboxId), false)
})

await check('timeout and kill', async () => {
  await sbx.setTimeout(60_000)
  const connected = await Sandbox.connect(sbx.sandboxId)
  assert.equal((await connected.commands.run('echo again')).stdout, 'again\n')
  await sbx.kill()
  await assert.rejects(Sandbox.getInfo(sbx.sandboxId), (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
})
