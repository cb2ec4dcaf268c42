// The unmodified JS SDK with only E2B_DOMAIN and E2B_API_KEY set (and NODE_EXTRA_CA_CERTS naming the
// installation's CA): the API at https://api.<domain>, envd at https://49983-<id>.<domain>. Prints one line
// per check, exits non-zero on failure.
import assert from 'node:assert/strict'
import { Sandbox } from 'e2b'

const domain = process.env.E2B_DOMAIN
assert.ok(domain && !process.env.E2B_API_URL && !process.env.E2B_SANDBOX_URL)

const sbx = await Sandbox.create({ timeoutMs: 120_000 })
try {
  const run = await sbx.commands.run('echo hi from $(hostname)')
  assert.equal(run.stdout.trim(), `hi from ${sbx.sandboxId}`)
  console.log('ok create and run')
  await sbx.files.write('/home/user/js.txt', 'js over https')
  assert.equal(await sbx.files.read('/home/user/js.txt'), 'js over https')
  console.log('ok files')
  assert.equal(sbx.getHost(3000), `3000-${sbx.sandboxId}.${domain}`)
  console.log('ok host')
} finally {
  await sbx.kill()
}
