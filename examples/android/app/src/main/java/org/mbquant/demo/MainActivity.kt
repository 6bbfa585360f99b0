package org.mbquant.demo

import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import android.os.Build
import android.os.Bundle as AndroidBundle
import android.os.SystemClock
import android.provider.MediaStore
import android.view.View
import android.widget.Button
import android.widget.ImageView
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import org.mbquant.demo.core.Bundle
import org.mbquant.demo.core.BundleException
import org.mbquant.demo.core.BundleProblem
import org.mbquant.demo.core.Preprocessor
import org.mbquant.demo.core.TopK
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.io.File

/**
 * Loads the bundle pushed with examples/android/push_bundle.sh (app-specific storage: no permission needed),
 * classifies an image from the gallery or the camera with the bundle's own preprocessing, and shows the top-5
 * labels with probabilities and the inference time. Everything but the Android plumbing lives in the plain
 * Kotlin classes of org.mbquant.demo.core (tested on the JVM against mbquant's Python reference).
 */
class MainActivity : AppCompatActivity() {
    private var bundle: Bundle? = null
    private var module: Module? = null

    private lateinit var title: TextView
    private lateinit var help: TextView
    private lateinit var results: TextView
    private lateinit var image: ImageView
    private lateinit var actions: View
    private lateinit var retry: Button

    private val pick = registerForActivityResult(ActivityResultContracts.GetContent()) { uri: Uri? ->
        if (uri != null) classify(decode(uri))
    }
    private val camera = registerForActivityResult(ActivityResultContracts.TakePicturePreview()) { bitmap: Bitmap? ->
        if (bitmap != null) classify(bitmap)
    }

    private val bundleDir: File get() = File(getExternalFilesDir(null), "bundle")

    override fun onCreate(savedInstanceState: AndroidBundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        title = findViewById(R.id.status_title)
        help = findViewById(R.id.status_help)
        results = findViewById(R.id.results)
        image = findViewById(R.id.image)
        actions = findViewById(R.id.actions)
        retry = findViewById(R.id.retry)
        findViewById<Button>(R.id.pick).setOnClickListener { pick.launch("image/*") }
        findViewById<Button>(R.id.camera).setOnClickListener { camera.launch(null) }
        retry.setOnClickListener { load() }
        load()
    }

    private fun load() {
        module?.destroy()
        module = null
        try {
            val b = Bundle.read(bundleDir)
            module = try {
                Module.load(b.model.absolutePath)
            } catch (e: Exception) {
                throw BundleException(BundleProblem.CORRUPT, "ExecuTorch could not load model.pte: ${e.message}")
            }
            bundle = b
            show(getString(R.string.app_name), "${b.labels.size} classes, input ${b.spec.width}x${b.spec.height}",
                 ready = true)
        } catch (e: BundleException) {
            showProblem(e)
        }
    }

    private fun showProblem(e: BundleException) {
        when (e.problem) {
            BundleProblem.MISSING -> show(getString(R.string.missing_title),
                                          getString(R.string.missing_help, bundleDir.absolutePath) + "\n\n" + e.message,
                                          ready = false)
            BundleProblem.CORRUPT -> show(getString(R.string.corrupt_title),
                                          "${e.message}\n\n${getString(R.string.corrupt_help)}", ready = false)
            BundleProblem.WRONG_INPUT -> show(getString(R.string.input_title),
                                              "${e.message}\n\n${getString(R.string.input_help)}", ready = false)
        }
    }

    private fun show(heading: String, text: String, ready: Boolean) {
        title.text = heading
        help.text = text
        actions.visibility = if (ready) View.VISIBLE else View.GONE
        retry.visibility = if (ready) View.GONE else View.VISIBLE
        results.text = ""
    }

    private fun decode(uri: Uri): Bitmap =
        if (Build.VERSION.SDK_INT >= 28) {
            ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)) { decoder, _, _ ->
                decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE   // readable pixels
            }
        } else {
            @Suppress("DEPRECATION")
            MediaStore.Images.Media.getBitmap(contentResolver, uri)
        }

    private fun classify(source: Bitmap) {
        val b = bundle ?: return
        val m = module ?: return
        val bitmap = if (source.config == Bitmap.Config.ARGB_8888) source else source.copy(Bitmap.Config.ARGB_8888, false)
        image.setImageBitmap(bitmap)
        val pixels = IntArray(bitmap.width * bitmap.height)
        bitmap.getPixels(pixels, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
        val input = Preprocessor(b.spec).tensor(pixels, bitmap.width, bitmap.height)
        val shape = longArrayOf(1, 3, b.spec.height.toLong(), b.spec.width.toLong())
        val start = SystemClock.elapsedRealtimeNanos()
        val logits = try {
            m.forward(EValue.from(Tensor.fromBlob(input, shape)))[0].toTensor().dataAsFloatArray
        } catch (e: Exception) {
            showProblem(BundleException(BundleProblem.WRONG_INPUT,
                "forward failed for input ${shape.joinToString("x")}: ${e.message}"))
            return
        }
        val ms = (SystemClock.elapsedRealtimeNanos() - start) / 1e6
        if (logits.size != b.labels.size) {
            showProblem(BundleException(BundleProblem.CORRUPT,
                "the model gives ${logits.size} outputs for ${b.labels.size} labels"))
            return
        }
        val lines = TopK.top(logits, b.labels, 5).joinToString("\n") {
            String.format("%-14s %6.2f %%", it.label, 100 * it.probability)
        }
        results.text = "$lines\n\ninference ${String.format("%.2f", ms)} ms (on this phone)"
    }

    override fun onDestroy() {
        module?.destroy()
        super.onDestroy()
    }
}
