'use strict';
// npm pack / npm publish: `copy` (prepack) puts the repository's proto/ and
// client/service_config.json into the package, so a tarball works outside the checkout;
// `clean` (postpack) removes them again, so the checkout never holds a copy that could go stale
// (index.js's findResources prefers the checkout's own files anyway).
//
//   node scripts/bundle-resources.js copy|clean
const fs = require('node:fs');
const path = require('node:path');

const packageDir = path.resolve(__dirname, '..');
const repoDir = path.resolve(packageDir, '..', '..');
const bundled = [
  {from: path.join(repoDir, 'proto', 'gradserve', 'v1'), to: path.join(packageDir, 'proto', 'gradserve', 'v1')},
  {from: path.join(repoDir, 'proto', 'grpc', 'health', 'v1'), to: path.join(packageDir, 'proto', 'grpc', 'health', 'v1')},
  {from: path.join(repoDir, 'client', 'service_config.json'), to: path.join(packageDir, 'service_config.json')},
];

const action = process.argv[2];
if (action === 'copy') {
  for (const {from, to} of bundled) {
    if (!fs.existsSync(from)) {
      console.error(`bundle-resources: ${from} is missing: pack from a gradserve checkout`);
      process.exit(1);
    }
    // Only the .proto files of the directories: no CMakeLists.txt or generated files.
    if (fs.statSync(from).isDirectory()) {
      fs.mkdirSync(to, {recursive: true});
      for (const name of fs.readdirSync(from).filter((n) => n.endsWith('.proto'))) {
        fs.copyFileSync(path.join(from, name), path.join(to, name));
      }
    } else {
      fs.copyFileSync(from, to);
    }
  }
} else if (action === 'clean') {
  fs.rmSync(path.join(packageDir, 'proto'), {recursive: true, force: true});
  fs.rmSync(path.join(packageDir, 'service_config.json'), {force: true});
} else {
  console.error('usage: node scripts/bundle-resources.js copy|clean');
  process.exit(2);
}
