package org.mbquant.demo.core

import java.io.File
import org.json.JSONException
import org.json.JSONObject

enum class BundleProblem { MISSING, CORRUPT, WRONG_INPUT }

class BundleException(val problem: BundleProblem, message: String) : Exception(message)

/** An app bundle folder as `mbquant bundle` writes it: model.pte, labels.txt, preprocess.json, report.json and the
 *  manifest bundle.json (its class count must be the number of labels). */
class Bundle(val root: File, val spec: PreprocessSpec, val labels: List<String>) {
    val model: File get() = File(root, "model.pte")

    companion object {
        val FILES = listOf("model.pte", "labels.txt", "preprocess.json", "report.json", "bundle.json")

        fun read(root: File): Bundle {
            if (!root.isDirectory) throw BundleException(BundleProblem.MISSING, "no bundle at ${root.path}")
            val missing = FILES.filter { !File(root, it).isFile }
            if (missing.isNotEmpty()) {
                throw BundleException(BundleProblem.MISSING, "the bundle lacks ${missing.joinToString(", ")}")
            }
            val head = File(root, "model.pte").inputStream().use { s -> ByteArray(8).also { s.read(it) } }
            if (head[4] != 'E'.toByte() || head[5] != 'T'.toByte()) {
                throw BundleException(BundleProblem.CORRUPT, "model.pte is not an ExecuTorch program")
            }
            val spec = PreprocessSpec.parse(File(root, "preprocess.json").readText())
            val labels = File(root, "labels.txt").readLines().filter { it.isNotEmpty() }
            if (labels.isEmpty()) throw BundleException(BundleProblem.CORRUPT, "labels.txt is empty")
            val classes = try { JSONObject(File(root, "bundle.json").readText()).optInt("classes", -1) }
                catch (e: JSONException) { -1 }
            if (classes != labels.size) {
                throw BundleException(BundleProblem.CORRUPT, "labels.txt has ${labels.size} names, bundle.json says $classes classes")
            }
            return Bundle(root, spec, labels)
        }
    }
}
