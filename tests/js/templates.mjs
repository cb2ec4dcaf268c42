// Builds templates on a real `corral serve` with the unmodified e2b JS SDK's `Template`, then starts
// sandboxes from them. Usage: node templates.mjs <scenario> <context dir> <run id>. The server comes from
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Prints one `ok <check>` line per check passed; a failed
// assertion exits non-zero with the reason on stderr.
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { BuildError, Sandbox, Template, waitForPort } from 'e2b'

const [scenario, contextDir, runId] = process.argv.slice(2)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function check(name, body) {
  await body()
  console.log(`ok ${name}`)
}

async function build(template, name, options = {}) {
  const logs = []
  const info = await Template.build(template, name, { ...options, onBuildLogs: (entry) => logs.push(entry) })
  return { info, logs: logs.map((entry) => entry.message) }
}

async function inSandbox(name, body) {
  const sandbox = await Sandbox.create(name, { timeoutMs: 120_000 })
  try {
    await body(sandbox, (cmd, opts) => sandbox.commands.run(cmd, opts))
  } finally {
    await sandbox.kill()
  }
}

const scenarios = {
  async 'files-users-and-start-command'() {
    await check('context from the caller', async () => {
      // Without fileContextPath the SDK takes the directory of the file that called Template().
      assert.equal(Template().fileContextPath, path.dirname(fileURLToPath(import.meta.url)))
    })
    const template = Template({ fileContextPath: contextDir })
      .fromTemplate('base')
      .copy('hello.txt', 'hello.txt')
      .copy('folder/*', 'folder', { forceUpload: true })
      .copy('logs/*.log', '/opt/logs/', { user: 'root', mode: 0o640 })
      .setEnvs({ GREETING: 'hi', BUILD_ONLY: 'yes' })
      .runCmd('echo "$GREETING from $(whoami) in $(pwd)" > greeting.txt')
      .runCmd('whoami > /tmp/root-was-here', { user: 'root' })
      .makeSymlink('.bashrc', '.bashrc.local')
      .setWorkdir('app')
      .runCmd('pwd > where.txt && readlink /home/user/.bashrc.local > link.txt')
      .setUser('builder')
      .runCmd('whoami > /home/builder/me.txt')
      .setUser('user')
      .setStartCmd('python3 -m http.server 8125 --directory /home/user', waitForPort(8125))
    const { info, logs } = await build(template, `js-files-${runId}`)
    await check('build', async () => {
      assert.match(info.templateId, /^[a-z0-9]{20}$/)
      assert.ok(logs.some((line) => line.includes('greeting.txt')), logs.join('\n'))
    })
    await inSandbox(`js-files-${runId}`, async (sandbox, run) => {
      await check('files', async () => {
        assert.equal((await run('cat /home/user/hello.txt')).stdout, 'hello from the context\n')
        assert.equal((await run('cat /home/user/folder/a.txt /home/user/folder/b.txt')).stdout, 'A\nB\n')
        assert.equal((await run('/home/user/folder/run.sh')).stdout, 'ran\n')
        assert.equal((await run('stat -c "%U %a" /home/user/folder/a.txt')).stdout, 'user 644\n')
        assert.equal((await run('ls /opt/logs')).stdout, 'one.log\ntwo.log\n')
        assert.equal((await run('stat -c "%U %a" /opt/logs/one.log')).stdout, 'root 640\n')
      })
      await check('symlinks', async () => {
        const links = await run('cd /home/user/folder && readlink relative-link absolute-link dangling-link')
        assert.equal(links.stdout, 'a.txt\n/etc/hostname\nmissing-target\n')
        assert.equal((await run('readlink /home/user/.bashrc.local')).stdout, '.bashrc\n')
      })
      await check('users and workdir', async () => {
        assert.equal((await run('cat /home/user/greeting.txt')).stdout, 'hi from user in /home/user\n')
        assert.equal((await run('cat /tmp/root-was-here')).stdout, 'root\n')
        assert.equal((await run('cat /home/user/app/where.txt')).stdout, '/home/user/app\n')
        assert.equal((await run('cat /home/builder/me.txt')).stdout, 'builder\n')
        assert.equal((await run('whoami && pwd')).stdout, 'user\n/home/user/app\n')
        assert.equal((await run('echo "[$BUILD_ONLY]"')).stdout, '[]\n')
      })
      await check('start command', async () => {
        const served = await run('curl -s http://127.0.0.1:8125/')
        assert.ok(served.stdout.includes('hello.txt'), served.stdout)
        assert.equal((await sandbox.getInfo()).templateId, info.templateId)
      })
    })
  },

  async 'folder-with-subfolder'() {
    // The JS SDK's filesHash counts each directory's size on the local filesystem (the Python SDK's does
    // not), and a tar does not carry it, so the server cannot recompute the hash of such an upload.
    const template = Template({ fileContextPath: contextDir }).fromTemplate('base').copy('tree', 'tree')
    await build(template, `js-tree-${runId}`)
    await inSandbox(`js-tree-${runId}`, async (sandbox, run) => {
      await check('folder with a subfolder', async () => {
        assert.equal((await run('cat /home/user/tree/top.txt /home/user/tree/sub/c.txt')).stdout, 'top\nC\n')
      })
    })
  },

  async 'failing-run'() {
    const source = readFileSync(fileURLToPath(import.meta.url), 'utf-8').split('\n')
    const failingLine = source.findIndex((line) => line.trimStart().startsWith(".runCmd('echo about to fail")) + 1
    const logs = []
    const template = Template()
      .fromTemplate('base')
      .runCmd('echo fine')
      .runCmd('echo about to fail >&2; exit 3')
    await check('build error', async () => {
      await assert.rejects(
        Template.build(template, `js-failing-${runId}`, { onBuildLogs: (entry) => logs.push(entry.message) }),
        (error) => {
          assert.ok(error instanceof BuildError, String(error))
          assert.match(error.message, /exit code 3/)
          // reason.step picks the stack frame of the step that failed: the line that added it.
          assert.ok(error.stack.includes(`templates.mjs:${failingLine}:`), error.stack)
          return true
        })
      assert.ok(logs.some((line) => line.includes('about to fail')), logs.join('\n'))
    })
  },

  async 'cached-rebuild'() {
    const template = (last) => Template()
      .fromTemplate('base')
      .runCmd(`echo one > /tmp/one # ${runId}`) // the layer cache outlives runs: steps it has never seen
      .runCmd('echo two > /tmp/two')
      .runCmd(`echo ${last} > /tmp/last`)
    await build(template('first'), `js-cached-${runId}`)
    const { logs } = await build(template('second'), `js-cached-${runId}`)
    await check('cached steps', async () => {
      assert.equal(logs.filter((line) => line.includes('CACHED')).length, 2, logs.join('\n'))
      assert.ok(logs.some((line) => line.includes('RUN echo second') && !line.includes('CACHED')), logs.join('\n'))
    })
    await inSandbox(`js-cached-${runId}`, async (sandbox, run) => {
      await check('rebuilt template', async () => {
        assert.equal((await run('cat /tmp/one /tmp/two /tmp/last')).stdout, 'one\ntwo\nsecond\n')
      })
    })
  },

  async 'background-and-tags'() {
    const name = `team-js/bg-${runId}` // a namespace: `/` in the path of exists and getTags
    const template = Template().fromTemplate('base').runCmd('sleep 2 && echo tagged > /tmp/tag')
    const info = await Template.buildInBackground(template, `${name}:v1`, { tags: ['stable'] })
    await check('build in background', async () => {
      assert.deepEqual([...info.tags].sort(), ['stable', 'v1'])
      assert.equal((await Template.getBuildStatus(info)).status, 'building')
      let status
      for (let i = 0; i < 240; i++) {
        status = await Template.getBuildStatus(info, { logsOffset: 0 })
        if (status.status !== 'building' && status.status !== 'waiting') break
        await sleep(500)
      }
      assert.equal(status.status, 'ready', JSON.stringify(status))
      assert.ok(status.logEntries.some((entry) => entry.message.includes('sleep 2')))
    })
    await check('exists', async () => {
      assert.equal(await Template.exists(name), true)
      assert.equal(await Template.exists('base'), true)
      assert.equal(await Template.exists(`js-never-built-${runId}`), false)
    })
    await check('tags', async () => {
      const tags = (await Template.getTags(name)).map((t) => t.tag)
      assert.ok(tags.includes('v1') && tags.includes('stable'), tags.join(','))
      const assigned = await Template.assignTags(`${name}:v1`, 'prod')
      assert.deepEqual(assigned.tags, ['prod'])
      assert.equal(assigned.buildId, info.buildId)
      await inSandbox(`${name}:prod`, async (sandbox, run) => {
        assert.equal((await run('cat /tmp/tag')).stdout, 'tagged\n')
      })
      await Template.removeTags(name, ['prod'])
      assert.ok(!(await Template.getTags(name)).some((t) => t.tag === 'prod'))
    })
  },
}

try {
  await scenarios[scenario]()
} catch (error) {
  // The SDK's BuildError carries the user's stack frame as its stack, without the message.
  console.error(`${error.name}: ${error.message}\n${error.stack}`)
  process.exit(1)
}
