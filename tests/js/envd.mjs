// Drives a bare envd with the unmodified e2b JS SDK. Usage: node envd.mjs <envd url> <access token>
// Prints one line per check and exits non-zero on the first failure.
import assert from 'node:assert/strict'
import { Sandbox, CommandExitError, AuthenticationError, FileNotFoundError } from 'e2b'

const [url, token] = process.argv.slice(2)
const connect = (accessToken) => new Sandbox({
  sandboxId: 'js-envd-test', envdAccessToken: accessToken, envdVersion: '0.6.4',
  sandboxUrl: url, apiKey: 'e2b_' + '0'.repeat(40),
})
const sbx = connect(token)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

await check('run', async () => {
  const result = await sbx.commands.run('echo hi; echo err >&2; whoami', { envs: { A: '1' } })
  assert.equal(result.stdout, 'hi\nuser\n')
  assert.equal(result.stderr, 'err\n')
  await assert.rejects(sbx.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)
})

await check('background, stdin and kill', async () => {
  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'from js\n')
  await sbx.commands.closeStdin(cat.pid)
  assert.equal((await cat.wait()).stdout, 'from js\n')
  const sleeper = await sbx.commands.run('sleep 60', { background: true })
  assert.ok((await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
  await assert.rejects(sleeper.wait(), CommandExitError)
  assert.equal(await sbx.commands.kill(sleeper.pid), false)
})

await check('pty', async () => {
  let output = ''
  const decoder = new TextDecoder()
  const terminal = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { output += decoder.decode(d) } })
  await sleep(1000)
  await sbx.pty.resize(terminal.pid, { cols: 120, rows: 33 })
  await sbx.pty.sendInput(terminal.pid, new TextEncoder().encode('stty size; exit\n'))
  await terminal.wait()
  assert.match(output, /33 120/)
})

await check('files', async () => {
  await sbx.files.write('/home/user/js/a.txt', 'hello from js')
  assert.equal(await sbx.files.read('/home/user/js/a.txt'), 'hello from js')
  const entries = await sbx.files.list('/home/user/js')
  assert.deepEqual(entries.map((e) => e.name), ['a.txt'])
  assert.equal(entries[0].owner, 'user')
  await assert.rejects(sbx.files.read('/home/user/js/none'), FileNotFoundError)
  assert.equal(await sbx.files.exists('/home/user/js/none'), false)
})

await check('watch', async () => {
  await sbx.files.makeDir('/home/user/jswatch/sub')
  const events = []
  const handle = await sbx.files.watchDir('/home/user/jswatch', (e) => events.push(e), { recursive: true })
  await sbx.files.write('/home/user/jswatch/sub/new.txt', 'x')
  for (let i = 0; i < 100 && !events.some((e) => e.name === 'sub/new.txt'); i++) await sleep(50)
  await handle.stop()
  assert.ok(events.some((e) => e.name === 'sub/new.txt' && e.type === 'create'), JSON.stringify(events))
})

await check('wrong token', async () => {
  await assert.rejects(connect('wrong').commands.run('true'), AuthenticationError)
})
